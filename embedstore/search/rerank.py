"""Searching a loaded index the way it was tuned: its own scores, or its top candidates re-ranked
exactly from the space's stored vectors (the sidecar's ``k_factor``), reading only those rows.

Crash safety: reads the store and the index only; writes nothing.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..index.files import LoadedIndex
from ..index.vectors import normalized
from ..store import Space

Search = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]
RERANK_FLOATS = 1 << 24  # candidate vector entries held at a time while re-ranking (64 MiB of float32)


def index_search(sp: Space, loaded: LoadedIndex) -> Search:
    """``search(queries, k) -> (scores, store rows)`` over ``loaded`` for normalised float32 queries."""
    params = loaded.info.get("params", {}) if isinstance(loaded.info.get("params"), dict) else {}
    k_factor = int(params.get("k_factor", 0) or 0)
    if not k_factor:
        return loaded.index.search
    ntotal = int(loaded.index.ntotal)

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, candidates = loaded.index.search(queries, max(k, min(ntotal, k * k_factor)))
        return rerank(sp, queries, candidates, k)

    return search


def rerank(sp: Space, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (cosine, store row) among each query's candidate rows (-1 = none), best first,
    reading the stored vectors of the candidates only, a block of queries at a time."""
    nq, nc = candidates.shape
    k = min(k, nc)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_r = np.full((nq, k), -1, np.int64)
    step = max(1, RERANK_FLOATS // max(1, nc * sp.dim))
    for a in range(0, nq, step):
        cand = candidates[a : a + step]
        flat = cand.reshape(-1)
        pos = np.full(flat.shape, -1, np.int64)
        valid = flat >= 0
        pos[valid] = sp.positions_of(flat[valid])
        ok = pos >= 0
        scores = np.full(flat.shape, -np.inf, np.float32)
        if ok.any():
            unique, back = np.unique(pos[ok], return_inverse=True)  # each row read once, in file order
            vectors = normalized(sp.vectors, unique)
            which = np.repeat(np.arange(len(cand)), nc)[ok]
            scores[ok] = np.einsum("ij,ij->i", queries[a : a + step][which], vectors[back.reshape(-1)])
        scores = scores.reshape(cand.shape)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(scores, order, axis=1)
        out_s[a : a + len(cand)] = best
        out_r[a : a + len(cand)] = np.where(np.isfinite(best), np.take_along_axis(cand, order, axis=1), -1)
    return out_s, out_r
