"""Vectors going into and out of faiss: normalised chunks of a (possibly HDF5) array, and exact
streamed k-NN.

Crash safety: reads only; nothing here writes a file.
"""
from __future__ import annotations

from typing import Any, Iterator

import faiss
import numpy as np

from .._vectors import l2_normalize
from ..errors import QueryError

CHUNK = 32768


def normalized(vectors: Any, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """A float32, L2-normalised copy of ``vectors[rows]`` (never modifies the source)."""
    return l2_normalize(vectors[rows])


def iter_chunks(n: int, chunk: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``, ``chunk`` rows each (the last may be shorter)."""
    for a in range(0, n, chunk):
        yield slice(a, min(n, a + chunk))


def exact_knn(queries: np.ndarray, vectors: Any, ids: np.ndarray, k: int,
              positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine of normalised ``queries`` over ``vectors`` (optionally only ``positions``).

    Streams the vectors in chunks through faiss's blocked search and a running heap, so memory
    stays at one chunk. Returns (scores, ids), best first, at most as many columns as rows searched.
    """
    if len(ids) != len(vectors):
        raise QueryError(f"exact_knn got {len(ids)} ids for {len(vectors)} vectors: give one id per vector")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    pos = np.arange(len(ids)) if positions is None else np.asarray(positions)
    k = max(1, min(k, len(pos)))  # never a heap larger than the rows there are
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for s in iter_chunks(len(pos)):
        p = pos[s]
        block = normalized(vectors, p if positions is not None else slice(p[0], p[-1] + 1))
        scores, found = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids[p][found])
    heap.finalize()
    return heap.D, heap.I
