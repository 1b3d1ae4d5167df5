"""Outliers (uniqueness): each image's mean cosine distance to its k nearest other images, ranked.

Crash safety: pure computation over the k-NN graph's batches; nothing here writes a file (the graph
itself is built and cached by :func:`embedstore.search.knn_graph`, the one ``duplicates`` uses).

An image far from all others (a corrupt file, a photo of the wrong thing, a rare view) has a large
k-NN distance; a near-duplicate has a small one. The score is ``1 - mean cosine`` of the k nearest
other images (the row itself and missing neighbours left out), so 0 is a duplicate and 1 is
orthogonal to every neighbour. Memory: one float per image.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..store import Space
from .records import image_records


class OutlierScores:
    """Mean k-NN cosine distance per position of a space, filled batch by batch from the k-NN graph."""

    def __init__(self, sp: Space, k: int) -> None:
        self.sp, self.k = sp, int(k)
        self.score = np.full(len(sp), np.nan, dtype=np.float32)  # NaN: no neighbour (a one-image space)

    def add(self, positions: slice, found: np.ndarray, scores: np.ndarray) -> None:
        """One batch of the graph: ``found`` store rows (-1 none) and their cosines, best first."""
        own = self.sp.rows[positions][:, None]
        valid = (found >= 0) & (found != own)
        first = np.argsort(~valid, axis=1, kind="stable")[:, : self.k]  # the valid neighbours, best first
        take = np.take_along_axis(valid, first, 1)
        sims = np.where(take, np.take_along_axis(scores, first, 1), 0.0)
        n = take.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.score[positions] = np.where(n > 0, 1.0 - sims.sum(1) / n, np.nan)

    def ranked(self, top: int | None) -> list[dict[str, Any]]:
        """The most isolated images first (``top`` of them; None: all): path, row, label, split, score."""
        scored = np.flatnonzero(~np.isnan(self.score))
        order = scored[np.argsort(-self.score[scored], kind="stable")]
        order = order if top is None else order[:top]
        return [{**image, "score": round(float(self.score[i]), 6)}
                for i, image in zip(order, image_records(self.sp, order))]

    @property
    def scored(self) -> int:
        return int((~np.isnan(self.score)).sum())
