"""A scikit-learn transformer: image paths in, embedding vectors out.

``make_pipeline(EmbeddingTransformer(), LogisticRegression())`` fits and predicts on file paths.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from ..backbones.load import DEFAULT_BACKBONE, load_backbone
from ..data.collection import ImageItem
from .embedder import Embedder, embed_items


class EmbeddingTransformer(TransformerMixin, BaseEstimator):
    """Embed image files with a frozen backbone.

    Parameters mirror :func:`embedstore.embed`. Unreadable images raise ``ValueError`` naming the
    files unless ``on_error="nan"``, which returns NaN rows for them.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | None = None,
        batch_size: int = 64,
        device: str = "auto",
        precision: str = "auto",
        workers: int | None = 0,
        on_error: str = "raise",
    ):
        self.backbone = backbone
        self.weights = weights
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.workers = workers
        self.on_error = on_error

    def fit(self, X: Sequence[str], y=None) -> "EmbeddingTransformer":
        self.embedder_ = Embedder(load_backbone(self.backbone, self.weights), self.device, self.precision)
        self.n_features_out_ = self.embedder_.backbone.dim
        return self

    def transform(self, X: Sequence[str]) -> np.ndarray:
        if not hasattr(self, "embedder_"):
            self.fit(X)
        items = [ImageItem(os.path.abspath(str(p)), str(p)) for p in X]
        vectors, results = embed_items(items, self.embedder_, self.batch_size, self.workers)
        bad = [f"{items[r.index].path} ({r.error}: {r.message})" for r in results if r.error]
        if bad and self.on_error == "raise":
            raise ValueError(f"{len(bad)} image(s) could not be read: " + "; ".join(bad[:5]))
        return vectors

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        return np.array([f"emb{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = False
        return tags
