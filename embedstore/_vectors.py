"""Vector maths shared by every stage: the one L2 normalisation (cosine similarity is inner product of unit rows).

Crash safety: pure functions; nothing is written.
"""
from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12  # rows shorter than this are left (near) zero instead of dividing by zero


def l2_normalize(vectors: Any, dtype: type = np.float32) -> np.ndarray:
    """A float copy of ``vectors`` (any array-like, e.g. an HDF5 slice) with unit-length rows."""
    x = np.array(vectors, dtype=dtype, copy=True, ndmin=2)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)
    return x


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of matching rows (NaN rows stay NaN, so they fail any threshold)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def median_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Median cosine similarity between matching rows of two matrices."""
    return float(np.median(cosines(a, b)))
