"""A scikit-learn transformer: image paths in, embedding vectors out.

``make_pipeline(EmbeddingTransformer(), LogisticRegression())`` fits and predicts on file paths.

Crash safety: reads image files and computes in memory; nothing is written.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .. import DEFAULT_BACKBONE
from ..backbones.load import load_backbone
from ..data.collection import ImageItem
from ..errors import CollectionError, EmbedOptionError
from .embedder import Embedder, embed_items

ON_ERROR = ("raise", "nan")


class EmbeddingTransformer(TransformerMixin, BaseEstimator):
    """Embed image files with a frozen backbone.

    Parameters mirror :func:`embedstore.embed`. ``fit`` loads the backbone (``embedder_``,
    ``n_features_out_``); ``transform`` before ``fit`` raises scikit-learn's ``NotFittedError``.
    Unreadable images raise :class:`embedstore.errors.CollectionError` (a ``ValueError``) naming
    the files unless ``on_error="nan"``, which returns NaN rows for them.
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

    def fit(self, X: Sequence[str], y: Any = None) -> "EmbeddingTransformer":
        """Load the backbone (the images are not read: a frozen backbone learns nothing from them)."""
        if self.on_error not in ON_ERROR:
            raise EmbedOptionError(f"on_error must be one of {', '.join(ON_ERROR)}, not {self.on_error!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise EmbedOptionError(f"batch_size must be a whole number >= 1, not {self.batch_size!r}")
        self.embedder_ = Embedder(load_backbone(self.backbone, self.weights), self.device, self.precision)
        self.n_features_out_ = self.embedder_.backbone.dim
        return self

    def transform(self, X: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 vectors of the image files ``X``, in order."""
        check_is_fitted(self, "embedder_")
        items = [ImageItem(os.path.abspath(str(p)), str(p)) for p in X]
        vectors, results = embed_items(items, self.embedder_, self.batch_size, self.workers)
        bad = [f"{items[r.index].path} ({r.error}: {r.message})" for r in results if r.error]
        if bad and self.on_error == "raise":
            raise CollectionError(f"{len(bad)} image(s) could not be read: " + "; ".join(bad[:5])
                                  + " — remove or fix them, or pass on_error='nan' for NaN rows")
        return vectors

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        check_is_fitted(self, "n_features_out_")
        return np.array([f"emb{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags
