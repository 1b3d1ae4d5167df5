"""Re-ranking an index's candidates exactly from the stored vectors, and searching a loaded index.

A compressed index (IVF-PQ codes) finds candidates; the best ``k_factor * k`` of them are scored
again by the exact cosine of the stored (float16) vectors, read only at the candidates'
positions (``Space.vectors[sorted positions]``). This replaces faiss's ``IndexRefineFlat``,
which keeps a float32 copy of every vector in memory, with a read of a few rows per query.

Crash safety: reads only; nothing here writes a file.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .vectors import iter_chunks, normalized

CANDIDATES_PER_BATCH = 65_536  # candidate vectors held at once (65536 x 512 float32 = 128 MiB)


def id_positions(ids: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``positions_of(ids)`` for an in-memory id array: the position of each id, -1 where absent."""
    ids = np.asarray(ids, np.int64)
    if len(ids) and np.array_equal(ids, np.arange(len(ids))):
        return lambda q: np.where((q >= 0) & (q < len(ids)), q, -1).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    srt = ids[order]

    def positions_of(q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, np.int64)
        if not len(srt):
            return np.full(len(q), -1, np.int64)
        at = np.clip(np.searchsorted(srt, q), 0, len(srt) - 1)
        return np.where(srt[at] == q, order[at], -1).astype(np.int64)
    return positions_of


def rerank(vectors: Any, positions_of: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
           candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k (scores, ids) of each query among its candidate ids, by exact cosine.

    ``vectors`` is the (n, dim) array-like the ids point into through ``positions_of`` (a store's
    ``Space.vectors`` and ``Space.positions_of``); only the candidates' rows are read, in sorted
    order, a batch of queries at a time. Candidates that are -1 or gone from ``vectors`` are
    dropped; rows of fewer than k hits are padded with -1 (score -inf).
    """
    queries = np.ascontiguousarray(queries, np.float32)
    candidates = np.asarray(candidates, np.int64)
    nq, width = candidates.shape
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    per = max(1, CANDIDATES_PER_BATCH // max(1, width))
    for s in iter_chunks(nq, per):
        cand = candidates[s]
        qi, ci = np.nonzero(cand >= 0)
        pos = positions_of(cand[qi, ci])
        ok = pos >= 0
        qi, ci, pos = qi[ok], ci[ok], pos[ok]
        scores = np.full(cand.shape, -np.inf, np.float32)
        if len(pos):
            uniq, inv = np.unique(pos, return_inverse=True)
            block = normalized(vectors, uniq)  # sorted positions: one ordered read
            scores[qi, ci] = np.einsum("ij,ij->i", block[inv], queries[s][qi])
        top = min(k, width)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        best = np.take_along_axis(scores, order, axis=1)
        ids = np.where(np.isfinite(best), np.take_along_axis(cand, order, axis=1), -1)
        out_s[s, :top], out_i[s, :top] = best, ids
    return out_s, out_i


def search_index(loaded: Any, sp: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, store rows) of L2-normalised ``queries`` by a :class:`.files.LoadedIndex` of space ``sp``.

    When the index was built to be re-ranked (its sidecar's ``params.k_factor``), the best
    ``k_factor * k`` candidates are re-ranked exactly from ``sp.vectors`` (only their rows are
    read); otherwise the index's own scores are returned. The caller sets faiss's threads.
    """
    q = np.ascontiguousarray(queries, np.float32)
    k_factor = loaded.k_factor
    if not k_factor:
        return loaded.index.search(q, k)
    _, candidates = loaded.index.search(q, max(k, min(int(loaded.index.ntotal), k * k_factor)))
    return rerank(sp.vectors, sp.positions_of, q, candidates, k)
