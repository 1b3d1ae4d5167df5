"""Tuning an index's search knob (nprobe, efSearch, re-ranking depth) to a target recall@10 on
held-out rows, and measuring single-query latency.

Re-ranking depth is ``k_factor_rf`` for faiss's refined indexes, and ``k_factor`` when the
candidates are re-ranked from the stored vectors (:mod:`.rerank`, a ``rerank`` callable here).

Crash safety: in-memory only; nothing here writes a file.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import faiss
import numpy as np

from .checks import PARAM_LIMITS, has_hnsw, is_refined
from .vectors import exact_knn, normalized

K_FACTORS = (16, 32, 64, 128)  # re-ranking depths tried, in order, for refined indexes
RERANK_PARAM = "k_factor"  # candidates per hit re-ranked from the stored vectors: ours, not a faiss parameter
Rerank = Callable[[np.ndarray, np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]  # (queries, candidates, k)


@dataclass
class Tuning:
    """Search parameters chosen for a target recall, and the recall they reach."""

    params: dict[str, int]
    recall: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    queries: int = 0
    met: bool = True  # the target holds with 95% confidence


def search_knob(index: faiss.Index) -> tuple[str, int, int] | None:
    """The parameter that trades speed for recall: (name, smallest, largest), or None (exact)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", 1, int(ivf.nlist)
    return ("efSearch", 16, PARAM_LIMITS["efSearch"]) if has_hnsw(index) else None


def set_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply search parameters (nprobe, efSearch, k_factor_rf) however deep the index nests them."""
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        if name != RERANK_PARAM:
            ps.set_index_parameter(index, name, value)


def searcher(index: faiss.Index, params: dict[str, int], rerank: Rerank | None = None
             ) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """``search(queries, k)`` over ``index``: with ``params[k_factor]`` and ``rerank``, the top
    ``k_factor * k`` candidates re-ranked exactly; else the index's own search."""
    k_factor = params.get(RERANK_PARAM, 0)
    if not (k_factor and rerank):
        return index.search

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, candidates = index.search(queries, max(k, min(int(index.ntotal), k * k_factor)))
        return rerank(queries, candidates, k)
    return search


def recall_per_query(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Fraction of each true neighbour list found (rows of ids, -1 for padding)."""
    return np.array([len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, int((t >= 0).sum())) for f, t in zip(found, truth)])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean recall of ``found`` against ``truth`` (1.0 for no queries)."""
    hits = recall_per_query(found, truth)
    return float(hits.mean()) if len(hits) else 1.0


def held_out(n: int, n_queries: int, seed: int, among: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions of tuning queries: at most a tenth of the rows, kept out of the index."""
    pool = np.arange(n) if among is None else among
    size = min(n_queries, len(pool), max(1, n // 10))
    return np.sort(np.random.default_rng(seed + 1).choice(pool, size, replace=False)) if n > 1 else pool[:0]


def true_neighbours(vectors: Any, ids: np.ndarray, queries_at: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids of held-out rows among the other rows (held-out ids dropped)."""
    _, found = exact_knn(normalized(vectors, queries_at), vectors, ids, k + min(k, len(queries_at)))
    drop = np.isin(found, ids[queries_at])
    out = np.full((len(found), k), -1, np.int64)
    for i, (row, bad) in enumerate(zip(found, drop)):
        kept = row[~bad & (row >= 0)][:k]
        out[i, : len(kept)] = kept
    return out


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, *, target_recall: float = 0.95,
         rerank: Rerank | None = None) -> Tuning:
    """Find the cheapest nprobe / efSearch whose recall@k on ``queries`` reaches ``target_recall``.

    ``queries`` must not be in the index (held-out rows); ``truth`` is their exact top-k. The target
    counts as met when it holds with 95% confidence over the sample (mean - 1.64 standard errors),
    so that it also holds for new queries. Doubles the parameter until the target is met, then
    bisects; when it cannot be met, takes the smallest value within 0.002 of the best recall seen.
    Refined indexes (and, with ``rerank``, any index whose candidates it re-ranks from the stored
    vectors) re-rank 16x k candidates, or 32x, 64x, 128x while that falls short.
    """
    if not len(queries) or not (truth >= 0).any():
        return Tuning({RERANK_PARAM: K_FACTORS[0]} if rerank else {}, 1.0)
    best = None
    name = RERANK_PARAM if rerank else "k_factor_rf"
    for k_factor in K_FACTORS if (rerank or is_refined(index)) else (None,):
        params = {name: k_factor} if k_factor else {}
        set_params(index, params)
        result = _tune_knob(index, queries, truth, target_recall, params, rerank)
        if best is None or result.recall > best.recall:
            best = result
        if result.met:
            break
    set_params(index, best.params)
    return best


def _tune_knob(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, target_recall: float,
               params: dict[str, int], rerank: Rerank | None = None) -> Tuning:
    knob = search_knob(index)
    k = truth.shape[1]
    search = searcher(index, params, rerank)

    met: dict[int, bool] = {}

    def measure(value: int | None) -> float:
        if value is not None:
            set_params(index, {knob[0]: value})
        hits = recall_per_query(search(queries, k)[1], truth)
        met[value] = hits.mean() - 1.64 * hits.std() / np.sqrt(len(hits)) >= target_recall
        return float(hits.mean())

    if knob is None:
        recall = measure(None)
        return Tuning(dict(params), recall, queries=len(queries), met=met[None])
    name, lo, hi = knob
    curve: list[tuple[int, float]] = []
    value, prev = max(lo, k) if name == "efSearch" else lo, None
    while True:
        curve.append((value, measure(value)))
        if met[value] or value >= hi:
            break
        prev, value = value, min(hi, value * 2)
    if met[value]:
        good, bad = value, (prev if prev is not None else value)
        while good - bad > max(1, good // 16):  # bisect to within ~6% of the cheapest value
            mid = (good + bad) // 2
            curve.append((mid, measure(mid)))
            good, bad = (mid, bad) if met[mid] else (good, mid)
        best = good
    else:
        top = max(r for _, r in curve)
        best = min(v for v, r in curve if r >= top - 0.002)
    recall = next(r for v, r in curve if v == best)
    return Tuning({**params, name: int(best)}, recall, sorted(set(curve)), len(queries), met[best])


@contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """Run faiss with n OpenMP threads inside the block.

    A single query is faster on one thread: waking a thread team costs more than it saves, and
    far more on a busy machine.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def query_latency(index: faiss.Index | Callable[[np.ndarray, int], Any], queries: np.ndarray, k: int = 10,
                  repeats: int = 200) -> tuple[float, float]:
    """p50 and p99 wall time of single-query searches (one thread), in milliseconds; ``index`` is an
    index or a ``search(queries, k)`` function (:func:`searcher`, re-ranking included)."""
    if not len(queries):
        return 0.0, 0.0
    search = index if callable(index) and not isinstance(index, faiss.Index) else index.search
    times = []
    with omp_threads(1):
        for i in range(min(5, len(queries))):
            search(queries[i : i + 1], k)
        for i in range(repeats):
            q = queries[i % len(queries)][None]
            t0 = time.perf_counter()
            search(q, k)
            times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)
