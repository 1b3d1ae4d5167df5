"""Filling a faiss index from an array-like of vectors and tuning it: the training sample, the
chunks added, the held-out rows tuned on, and what a build measured (:class:`BuiltIndex`).

Every read is ``vectors[sorted positions]`` (the sample, fresh rows) or ``vectors[a:b]`` (the
chunks), each normalised on its own: the vectors are never copied whole.

Crash safety: in-memory only; nothing here writes a file (:mod:`.build` saves).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from ..errors import IndexBuildError
from ..utils import timed
from .budget import BuildPlan
from .checks import faiss_message
from .choose import kind_name
from .gpu import to_gpu
from .tune import Rerank, Tuning, held_out, query_latency, searcher, true_neighbours, tune
from .vectors import CHUNK, iter_chunks, normalized

RERANK_NOTE = "stored vectors"  # the sidecar's ``rerank``: candidates re-ranked from Space.vectors


def check_target(target_recall: float) -> None:
    """IndexBuildError unless ``target_recall`` is in (0, 1]."""
    if not 0 < target_recall <= 1:
        raise IndexBuildError(f"target recall must be in (0, 1], not {target_recall}: e.g. 0.95")


def reserve(index: faiss.Index, n: int) -> None:
    """Size an empty index's flat vector storage for n vectors at once.

    Grown chunk by chunk, a vector doubles its buffer and briefly holds old and new copies: 3 GB
    of peak memory for 2 GB of vectors.
    """
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap):
        idx = faiss.downcast_index(idx.index)
    inner = getattr(idx, "refine_index", None) or getattr(idx, "storage", None)
    flat = faiss.downcast_index(inner) if inner is not None else idx
    if isinstance(flat, faiss.IndexFlatCodes) and flat.ntotal == 0:
        flat.codes.resize(n * flat.code_size)
        flat.codes.resize(0)  # the capacity stays


def add_rows(index: faiss.Index, vectors: Any, ids: np.ndarray, positions: np.ndarray | None = None,
             skip: np.ndarray | None = None, chunk: int = CHUNK) -> None:
    """Add ``vectors[positions]`` (sorted) under their ``ids``, a chunk at a time; ``positions=None``:
    every row but ``skip``, read as consecutive slices ``vectors[a:b]``."""
    if positions is not None:
        for s in iter_chunks(len(positions), chunk):
            pos = positions[s]
            index.add_with_ids(normalized(vectors, pos), np.ascontiguousarray(ids[pos], dtype=np.int64))
        return
    for s in iter_chunks(len(ids), chunk):
        block, block_ids = normalized(vectors, s), np.ascontiguousarray(ids[s], dtype=np.int64)
        if skip is not None and len(skip):
            keep = ~np.isin(np.arange(s.start, s.stop), skip)
            block, block_ids = block[keep], block_ids[keep]
        if len(block_ids):
            index.add_with_ids(block, block_ids)


def train_and_add(index: faiss.Index, vectors: Any, ids: np.ndarray, skip: np.ndarray, device: str,
                  stages: dict[str, float], plan: BuildPlan, seed: int = 0,
                  notes: list[str] | None = None) -> faiss.Index:
    """Train ``index`` on a sample of ``plan.train_rows`` rows (when it needs training), then add
    every row but ``skip``, ``plan.chunk_rows`` at a time."""
    n = len(ids)
    work, gpu_res = index, None
    if device == "cuda":
        work, gpu_res = to_gpu(index, notes if notes is not None else [])
    if not work.is_trained:
        with timed(stages, "train"):
            size = max(1, min(n, plan.train_rows))
            sample = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
            try:
                work.train(normalized(vectors, sample))
            except RuntimeError as e:  # a layout check_trainable does not know
                raise IndexBuildError(f"faiss could not train this index kind on {len(sample)} vectors "
                                      f"({faiss_message(e)}): choose --kind auto or flat, fewer lists, "
                                      "or embed more images") from None
            del sample
    with timed(stages, "add"):
        reserve(work, n)
        add_rows(work, vectors, ids, skip=skip, chunk=plan.chunk_rows)
    if gpu_res is not None and work is not index:
        index = faiss.index_gpu_to_cpu(work)
    return index


@dataclass
class BuiltIndex:
    """An index in memory with what its build measured; ``search`` re-ranks when the build does."""

    index: faiss.Index
    factory: str
    tuning: Tuning
    latency_ms: tuple[float, float]
    stages: dict[str, float]
    notes: list[str]
    rerank: Rerank | None = None
    plan: BuildPlan | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) of normalised queries, re-ranked from the vectors when built so."""
        return searcher(self.index, self.tuning.params, self.rerank)(np.ascontiguousarray(queries, np.float32), k)

    def report(self) -> dict[str, Any]:
        out = {
            "kind": kind_name(self.factory) + ("+rerank" if self.rerank else ""),
            "factory": self.factory,
            "params": self.tuning.params,
            "rows": int(self.index.ntotal),
            "recall_at_10": round(self.tuning.recall, 4),
            "recall_queries": self.tuning.queries,
            "latency_p50_ms": round(self.latency_ms[0], 3),
            "latency_p99_ms": round(self.latency_ms[1], 3),
            "tuning_curve": [[v, round(r, 4)] for v, r in self.tuning.curve],
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
            "notes": self.notes,
        }
        if self.rerank:
            out["rerank"] = RERANK_NOTE
        if self.plan is not None:
            out["memory_plan"] = self.plan.describe()
        return out


def grow_and_tune(index: faiss.Index, factory: str, vectors: Any, ids: np.ndarray, add: np.ndarray,
                  held: np.ndarray, target_recall: float, stages: dict[str, float], notes: list[str],
                  seed: int = 0, rerank_fn: Rerank | None = None, chunk: int = CHUNK) -> BuiltIndex:
    """Add rows ``add``, tune on the held-out rows ``held`` (not yet in the index), then add them."""
    with timed(stages, "add"):
        add_rows(index, vectors, ids, add, chunk=chunk)
    with timed(stages, "tune"):
        k = min(10, len(ids) - len(held))
        truth = true_neighbours(vectors, ids, held, k) if k > 0 and len(held) else np.empty((0, 1), np.int64)
        queries = normalized(vectors, held)
        tuning = tune(index, queries, truth, target_recall=target_recall, rerank=rerank_fn)
    if not tuning.met:
        notes.append(f"recall@10 {tuning.recall:.3f} falls short of the target {target_recall}: this index's codes are "
                     "too coarse; raise --memory or choose --kind hnsw / ivf-pq-refine")
    with timed(stages, "latency"):
        if not len(queries):  # too few rows to hold any out: time stored rows instead
            queries = normalized(vectors, held_out(len(ids), 200, seed, np.arange(len(ids))))
        latency = query_latency(searcher(index, tuning.params, rerank_fn), queries, repeats=repeats(rerank_fn))
    with timed(stages, "add"):
        add_rows(index, vectors, ids, held, chunk=chunk)
    return BuiltIndex(index, factory, tuning, latency, stages, notes, rerank_fn)


def repeats(rerank_fn: Rerank | None) -> int:
    """Single queries timed: fewer when each reads its candidates from the store."""
    return 50 if rerank_fn else 200
