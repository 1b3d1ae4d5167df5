"""FAISS indexes over an embedding space: choose, build, tune, save, load, grow.

Cosine similarity throughout: vectors are L2-normalised float32 compared by inner product.
Index ids are store rows (``Space.rows``), so every hit maps straight back to the images table.

Files, beside ``photos.h5`` in ``photos.h5.index/``::

    <space>.<g>.faiss      the index (``faiss.write_index``), ids = store rows
    <space>.<g>.rows.npy   (n, 2) int64: indexed row, fingerprint of the vector it was given
    <space>.json           sidecar: generation g, kind, factory, parameters, rows, recall@10,
                           latency, seconds, bytes

Every build writes a new generation ``g`` beside the current one (each file under a temporary
name, fsynced, renamed), then replaces the sidecar, which is the single switch from the old
generation to the new; only then are the old files removed. A build killed at any moment
leaves the previous index whole and in use. The sidecar records the sizes of the other two
files, so damage is detected when the index is loaded.

Incremental: ``build_index`` on a space that already has an index adds only the rows it lacks.
A row whose vector changed (its image file changed and was embedded again) or that left the
space is removed first (``remove_ids``); index types that cannot remove (HNSW, refined indexes)
are rebuilt instead, and so is an index whose layout would be chosen differently at the new size.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

from ..choices import INDEX_KINDS
from .checks import check_params, check_sidecar, check_trainable, faiss_message, valid_generation
from ..errors import IndexFileError, SidecarError, StoreError
from ..store.store import Space, Store, open_store
from ..utils import format_size, parse_size, timed

FORMAT = "embedstore-index/1"
KINDS = INDEX_KINDS
CHUNK = 32768
FLAT_MAX_ROWS = 20_000  # exact search answers a query in about a millisecond below this
HNSW_MAX_ROWS = 100_000  # HNSW builds in about a minute on two cores below this
HNSW_M = 32
K_FACTORS = (16, 32, 64, 128)  # re-ranking depths tried, in order, for refined indexes


# --------------------------------------------------------------------------- vectors


def normalized(vectors: Any, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """A float32, L2-normalised copy of ``vectors[rows]`` (never modifies the source)."""
    x = np.array(vectors[rows], dtype=np.float32, copy=True, order="C")
    if x.size:
        faiss.normalize_L2(x)
    return x


def iter_chunks(n: int, chunk: int = CHUNK) -> Iterator[slice]:
    for a in range(0, n, chunk):
        yield slice(a, min(n, a + chunk))


def vector_fingerprints(vectors: Any, chunk: int = 8192) -> np.ndarray:
    """An exact 64-bit hash of each row's bytes: tells which stored vectors changed."""
    n, dim = vectors.shape
    out = np.empty(n, np.int64)
    weights = np.random.default_rng(20240611).integers(1, 2**63, size=dim, dtype=np.uint64) | np.uint64(1)
    for s in iter_chunks(n, chunk):
        block = np.ascontiguousarray(vectors[s])
        raw = block.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[block.dtype.itemsize]).astype(np.uint64)
        out[s] = (raw * weights).sum(axis=1, dtype=np.uint64).view(np.int64)
    return out


def exact_knn(queries: np.ndarray, vectors: Any, ids: np.ndarray, k: int,
              positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine of normalised ``queries`` over ``vectors`` (optionally only ``positions``).

    Streams the vectors in chunks through faiss's blocked search and a running heap, so memory
    stays at one chunk. Returns (scores, ids), best first, at most as many columns as rows searched.
    """
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
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


# --------------------------------------------------------------------------- choosing


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: sqrt(n) rounded to a power of two, at least 39 vectors each.

    autofaiss takes 4*sqrt(n) and up; on a CPU the k-means and the assignment of every vector
    cost O(n * lists), and with fast-scan codes scanning the longer lists stays cheap.
    """
    lists = 2 ** round(np.log2(max(1.0, np.sqrt(n))))
    return int(max(1, min(lists, 16384, n // 39)))


def pq_factory(n: int, dim: int, budget: int) -> str:
    """The largest OPQ+IVF+PQ code that fits ``budget`` bytes (autofaiss's rule), at most 64 bytes.

    Sub-vectors keep at least 8 dimensions (k-means on fewer is slow in faiss and adds little);
    below 10k vectors, too few to train 256 centroids per sub-quantizer, codes are 4-bit and
    there is no OPQ rotation.
    """
    lists = ivf_lists(n)
    big = n >= 10_000
    for m in (64, 48, 32, 24, 16, 8, 4, 2, 1):
        if dim % m or (dim // m < 8 and m > 1):
            continue
        if n * (m // (1 if big else 2) + 8) + lists * dim * 4 + dim * dim * 4 <= budget:
            return f"OPQ{m},IVF{lists},PQ{m}np" if big else f"IVF{lists},PQ{m}x4np"
    raise ValueError(
        f"--memory {format_size(budget)} is too small for {n} vectors of dimension {dim}: "
        f"allow at least {format_size(n * 9 + lists * dim * 4 + dim * dim * 4)}"
    )


def estimate_bytes(factory: str, n: int, dim: int) -> int:
    """Rough memory of an index built with ``factory`` over n vectors (ids included)."""
    f = factory.upper()
    flat = n * dim * 4
    lists = int(m.group(1)) if (m := re.search(r"IVF(\d+)", f)) else 0
    extra = n * 8 + lists * dim * 4
    if "HNSW" in f and lists == 0:
        m_hnsw = int(m.group(1)) if (m := re.search(r"HNSW(\d+)", f)) else HNSW_M
        return flat + n * m_hnsw * 2 * 4 + extra
    code = flat if ("FLAT" in f and "PQ" not in f) else 0
    if m := re.search(r"PQ(\d+)(X4FS)?", f):
        code = n * int(m.group(1)) // (2 if m.group(2) else 1)
    if "SQ8" in f:
        code = n * dim
    if "SQFP16" in f:
        code = n * dim * 2
    refine = flat if "RFLAT" in f else 0
    return code + refine + extra


def choose_factory(n: int, dim: int, memory: str | int = "4G") -> str:
    """The index an autofaiss-style rule picks for n vectors of dimension dim within ``memory``.

    * n < 20k: ``Flat`` (exact; a query costs about a millisecond)
    * n < 100k and the vectors fit: ``HNSW32`` (best latency; builds in about a minute on two cores)
    * the vectors fit: ``IVF{lists},PQ{dim/4}x4fs,RFlat``: an inverted file scanned with 4-bit
      fast-scan codes (1/32 of the bytes of IVF-Flat), whose best candidates are re-ranked exactly
      against the full vectors. On overlapping clusters (``benchmarks/search.py --hard``, 1M x 512,
      two cores) it reaches recall@10 0.95 at 1.8 ms a query where IVF-Flat needs 22 ms. HNSW32
      took 15-46 s to build over 100k such vectors (so minutes at 1M), and on the hard set needed
      efSearch 480 (3.4 ms a query) already at 100k.
    * otherwise ``OPQ{m},IVF{lists},PQ{m}`` with the largest code that fits (no re-ranking).
    """
    budget = parse_size(memory)
    candidates = []
    if n < FLAT_MAX_ROWS:
        candidates.append("Flat")
    elif n < HNSW_MAX_ROWS:
        candidates.append(f"HNSW{HNSW_M}")
    if dim % 4 == 0:
        candidates.append(f"IVF{ivf_lists(n)},PQ{dim // 4}x4fs,RFlat")
    candidates.append(f"IVF{ivf_lists(n)},Flat")
    for factory in candidates:
        if estimate_bytes(factory, n, dim) <= budget:
            return factory
    return pq_factory(n, dim, budget)


def resolve_kind(kind: str, n: int, dim: int, memory: str | int = "4G") -> str:
    """The faiss factory string for a ``--kind`` (a kind name or a factory string)."""
    factory = _named_factory(kind, n, dim, parse_size(memory))
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(
            f"unknown index kind {kind!r}: use one of {', '.join(KINDS)} or a faiss factory string "
            f"such as 'IVF256,SQ8' ({faiss_message(e)})"
        ) from None
    check_trainable(index, factory, kind, n)  # before faiss's own assertion in the middle of training
    return factory


def _named_factory(kind: str, n: int, dim: int, budget: int) -> str:
    if kind == "auto":
        return choose_factory(n, dim, budget)
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M}"
    if kind == "ivf-flat":
        return f"IVF{ivf_lists(n)},Flat"
    if kind == "ivf-pq":
        return pq_factory(n, dim, budget)
    if kind == "ivf-pq-refine":
        if dim % 4:
            raise ValueError(f"--kind ivf-pq-refine needs a dimension divisible by 4, not {dim}")
        return f"IVF{ivf_lists(n)},PQ{dim // 4}x4fs,RFlat"
    return kind


def kind_name(factory: str) -> str:
    """A short name for a factory string: flat, hnsw, ivf-flat, ivf-pq, ivf-pq-refine or the string."""
    f = factory.upper()
    if f == "FLAT":
        return "flat"
    if re.fullmatch(r"HNSW\d+(,FLAT)?", f):
        return "hnsw"
    if re.fullmatch(r"IVF\d+,FLAT", f):
        return "ivf-flat"
    if re.fullmatch(r"IVF\d+,PQ\d+X4FS,RFLAT", f):
        return "ivf-pq-refine"
    if re.fullmatch(r"(OPQ\d+(_\d+)?,)?IVF\d+,PQ\d+(X\d+)?(NP)?", f):
        return "ivf-pq"
    return factory


# --------------------------------------------------------------------------- devices


def faiss_gpus() -> int:
    """GPUs usable by faiss: 0 unless faiss's GPU build is installed (the ``gpu`` extra: ``pip install -e ".[gpu]"``)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def resolve_faiss_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if faiss_gpus() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not faiss_gpus():
            raise RuntimeError(
                "--device cuda needs faiss's GPU build and a visible GPU: `pip install -e .[gpu]` in a checkout (faiss-gpu-cu12), "
                "or use --device cpu"
            )
        return "cuda"
    raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")


# --------------------------------------------------------------------------- building


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index for ``factory`` that accepts store rows as ids."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.spherical = True  # centroids on the unit sphere, as the vectors are
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:  # faiss's defaults train PQ and OPQ for many minutes on two cores
            pq.cp.max_points_per_centroid = 64
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter, vt.niter_pq_0, vt.max_train_points = 8, 10, 32768
    if not _takes_ids(index):
        index = faiss.IndexIDMap(index)
    return index


def _takes_ids(index: faiss.Index) -> bool:
    idx = faiss.downcast_index(index)
    while isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    return isinstance(idx, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2))


def _train_size(index: faiss.Index, n: int) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    lists = ivf.nlist if ivf is not None else 0
    return min(n, max(64 * lists, 65_536))


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


def add_rows(index: faiss.Index, vectors: Any, ids: np.ndarray, positions: np.ndarray) -> None:
    """Add ``vectors[positions]`` (sorted) under ``ids[positions]``, a chunk at a time."""
    for s in iter_chunks(len(positions)):
        pos = positions[s]
        index.add_with_ids(normalized(vectors, pos), np.ascontiguousarray(ids[pos], dtype=np.int64))


def train_and_add(index: faiss.Index, vectors: Any, ids: np.ndarray, positions: np.ndarray, device: str,
                  stages: dict[str, float], seed: int = 0, notes: list[str] | None = None) -> faiss.Index:
    """Train ``index`` on a sample of ``vectors`` (when it needs training), then add ``positions``."""
    n = len(ids)
    work, gpu_res = index, None
    if device == "cuda":
        work, gpu_res = _to_gpu(index, notes if notes is not None else [])
    if not work.is_trained:
        with timed(stages, "train"):
            sample = np.sort(np.random.default_rng(seed).choice(n, _train_size(index, n), replace=False))
            try:
                work.train(normalized(vectors, sample))
            except RuntimeError as e:  # a layout check_trainable does not know
                raise ValueError(f"faiss could not train this index kind on {len(sample)} vectors ({faiss_message(e)}): "
                                 "choose --kind auto or flat, fewer lists, or embed more images") from None
    with timed(stages, "add"):
        reserve(work, n)
        add_rows(work, vectors, ids, positions)
    if gpu_res is not None and work is not index:
        index = faiss.index_gpu_to_cpu(work)
    return index


def _to_gpu(index: faiss.Index, notes: list[str]) -> tuple[faiss.Index, Any]:
    """The index on GPU 0; else the CPU index with its k-means on the GPU; else as it is."""
    res = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(res, 0, index), res
    except (RuntimeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(ivf.d))
            notes.append(f"k-means ran on the GPU; this index type is filled on the CPU ({reason})")
            return index, res
        notes.append(f"this index type has no GPU version: built on the CPU ({reason})")
        return index, None


# --------------------------------------------------------------------------- tuning


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
    idx = faiss.downcast_index(index)
    while not isinstance(idx, faiss.IndexHNSW):
        inner = getattr(idx, "index", None) or getattr(idx, "base_index", None)
        if inner is None:
            return None
        idx = faiss.downcast_index(inner)
    return "efSearch", 16, 4096


def set_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply search parameters (nprobe, efSearch, k_factor_rf) however deep the index nests them."""
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, value)


def is_refined(index: faiss.Index) -> bool:
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap):
        idx = faiss.downcast_index(idx.index)
    return isinstance(idx, faiss.IndexRefine)


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


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, *, target_recall: float = 0.95) -> Tuning:
    """Find the cheapest nprobe / efSearch whose recall@k on ``queries`` reaches ``target_recall``.

    ``queries`` must not be in the index (held-out rows); ``truth`` is their exact top-k. The target
    counts as met when it holds with 95% confidence over the sample (mean - 1.64 standard errors),
    so that it also holds for new queries. Doubles the parameter until the target is met, then
    bisects; when it cannot be met, takes the smallest value within 0.002 of the best recall seen.
    Refined indexes re-rank 16x k candidates, or 32x, 64x, 128x while that falls short.
    """
    if not len(queries) or not (truth >= 0).any():
        return Tuning({}, 1.0)
    best = None
    for k_factor in K_FACTORS if is_refined(index) else (None,):
        params = {"k_factor_rf": k_factor} if k_factor else {}
        set_params(index, params)
        result = _tune_knob(index, queries, truth, target_recall, params)
        if best is None or result.recall > best.recall:
            best = result
        if result.met:
            break
    set_params(index, best.params)
    return best


def _tune_knob(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, target_recall: float,
               params: dict[str, int]) -> Tuning:
    knob = search_knob(index)
    k = truth.shape[1]

    met: dict[int, bool] = {}

    def measure(value: int | None) -> float:
        if value is not None:
            set_params(index, {knob[0]: value})
        hits = recall_per_query(index.search(queries, k)[1], truth)
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


def query_latency(index: faiss.Index, queries: np.ndarray, k: int = 10, repeats: int = 200) -> tuple[float, float]:
    """p50 and p99 wall time of single-query searches (one thread), in milliseconds."""
    if not len(queries):
        return 0.0, 0.0
    times = []
    with omp_threads(1):
        for i in range(min(5, len(queries))):
            index.search(queries[i : i + 1], k)
        for i in range(repeats):
            q = queries[i % len(queries)][None]
            t0 = time.perf_counter()
            index.search(q, k)
            times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


# --------------------------------------------------------------------------- whole builds


@dataclass
class BuiltIndex:
    """An index in memory with what its build measured."""

    index: faiss.Index
    factory: str
    tuning: Tuning
    latency_ms: tuple[float, float]
    stages: dict[str, float]
    notes: list[str]

    def report(self) -> dict[str, Any]:
        return {
            "kind": kind_name(self.factory),
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


def grow_and_tune(index: faiss.Index, factory: str, vectors: Any, ids: np.ndarray, add: np.ndarray,
                  held: np.ndarray, target_recall: float, stages: dict[str, float], notes: list[str],
                  seed: int = 0) -> BuiltIndex:
    """Add rows ``add``, tune on the held-out rows ``held`` (not yet in the index), then add them."""
    with timed(stages, "add"):
        add_rows(index, vectors, ids, add)
    with timed(stages, "tune"):
        k = min(10, len(ids) - len(held))
        truth = true_neighbours(vectors, ids, held, k) if k > 0 and len(held) else np.empty((0, 1), np.int64)
        queries = normalized(vectors, held)
        tuning = tune(index, queries, truth, target_recall=target_recall)
    if not tuning.met:
        notes.append(f"recall@10 {tuning.recall:.3f} falls short of the target {target_recall}: this index's codes are "
                     "too coarse; raise --memory or choose --kind hnsw / ivf-pq-refine")
    with timed(stages, "latency"):
        if not len(queries):  # too few rows to hold any out: time stored rows instead
            queries = normalized(vectors, held_out(len(ids), 200, seed, np.arange(len(ids))))
        latency = query_latency(index, queries)
    with timed(stages, "add"):
        add_rows(index, vectors, ids, held)
    return BuiltIndex(index, factory, tuning, latency, stages, notes)


def index_vectors(vectors: Any, ids: np.ndarray | None = None, *, kind: str = "auto", memory: str | int = "4G",
                  target_recall: float = 0.95, device: str = "auto", n_queries: int = 500,
                  seed: int = 0) -> BuiltIndex:
    """Build and tune an index over an (n, dim) array-like (numpy, h5py, ...) without a store.

    Args:
        vectors: rows to index; read in chunks and L2-normalised on the way in.
        ids: int64 id of each row (default 0..n-1).
        kind: ``auto``, ``flat``, ``hnsw``, ``ivf-flat``, ``ivf-pq``, ``ivf-pq-refine`` or a faiss
            factory string.
        memory: index memory budget, e.g. ``"4G"``; ``auto`` and ``ivf-pq`` stay within it.
        target_recall: recall@10 that tuning aims for.
        device: ``auto`` (GPU when faiss's GPU build sees one), ``cpu`` or ``cuda``.
        n_queries: rows held out of the index while tuning (then added), for recall and latency.
        seed: seed of the training and held-out samples.
    """
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    stages: dict[str, float] = {}
    notes: list[str] = []
    factory = resolve_kind(kind, n, dim, memory)
    held = held_out(n, n_queries, seed)
    index = train_and_add(new_index(factory, dim), vectors, ids, np.setdiff1d(np.arange(n), held),
                          resolve_faiss_device(device), stages, seed, notes)
    return grow_and_tune(index, factory, vectors, ids, held[:0], held, target_recall, stages, notes, seed)


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class IndexFiles:
    """Where the index of one space lives."""

    index: Path
    rows: Path
    sidecar: Path
    lock: Path
    generation: int = 0

    def next_generation(self) -> "IndexFiles":
        return _generation_files(self.sidecar.parent, self.sidecar.stem, self.generation + 1)

    def strays(self) -> list[Path]:
        """Files of other generations and temporaries left by a killed build."""
        stem = self.sidecar.stem
        keep = {self.index.name, self.rows.name, self.sidecar.name, self.lock.name}
        found = [*self.sidecar.parent.glob(f"{glob.escape(stem)}.*"),
                 *self.sidecar.parent.glob(f".{glob.escape(stem)}.*.tmp-*")]
        pattern = re.compile(rf"^\.?{re.escape(stem)}\.((\d+\.)?(faiss|rows\.npy)|json)(\.tmp-\d+)?$")
        return [f for f in found if f.name not in keep and pattern.match(f.name)]


def _generation_files(folder: Path, stem: str, generation: int) -> IndexFiles:
    prefix = f"{stem}.{generation}" if generation else stem  # generation 0: the names of embedstore 0.1
    return IndexFiles(folder / f"{prefix}.faiss", folder / f"{prefix}.rows.npy", folder / f"{stem}.json",
                      folder / f"{stem}.lock", generation)


def index_files(store: str | os.PathLike, space: str) -> IndexFiles:
    """The files of the space's current index generation (named by its sidecar; 0 when none)."""
    stem = re.sub(r"[^\w.+-]", "_", space)
    return index_files_at(Path(str(store) + ".index") / f"{stem}.json")


def index_files_at(sidecar: Path) -> IndexFiles:
    """The files a sidecar points to; generation 0 when it is absent, unreadable or tampered with
    (file names come from the space's name and a small generation number only)."""
    try:
        info = json.loads(sidecar.read_text())
        generation = info.get("generation", 0) if isinstance(info, dict) else 0
    except (OSError, ValueError):
        generation = 0
    return _generation_files(sidecar.parent, sidecar.stem, generation if valid_generation(generation) else 0)


@dataclass
class LoadedIndex:
    """An index read back from disk, with its sidecar and the rows it holds."""

    index: faiss.Index
    info: dict[str, Any]
    rows: np.ndarray  # indexed store rows, ascending
    fingerprints: np.ndarray  # fingerprint of each indexed row's vector
    files: IndexFiles


def _fix(store: str | os.PathLike, space: str) -> str:
    return f"rebuild it with `embedstore index {store} --space {space}`"


def load_index(store: str | os.PathLike | Store, space: str | None = None) -> LoadedIndex:
    """Read the index of a space (default: the store's first frozen space) with its tuned parameters.

    Raises ``IndexFileError``, naming the file and the fix, when it is missing, corrupt, or does
    not belong to this space's backbone (when ``store`` is an open ``Store``, that is checked).
    """
    st = store if isinstance(store, Store) else None
    path = st.path if st is not None else Path(store)
    if space is None:
        space = (st or open_store(path)).space().name
    files = index_files(path, space)
    try:
        return _load_files(files, path, space, st)
    except IndexFileError:
        latest = index_files(path, space)
        if latest.generation == files.generation:
            raise
        return _load_files(latest, path, space, st)  # a build switched generations while we read


def _load_files(files: IndexFiles, path: Path, space: str, st: Store | None) -> LoadedIndex:
    if not files.sidecar.exists():
        if files.index.exists():
            raise IndexFileError(f"index file {files.index} has no sidecar {files.sidecar.name}: {_fix(path, space)}")
        raise IndexFileError(f"space {space!r} of {path} has no index ({files.index} is missing): "
                             f"build one with `embedstore index {path} --space {space}`")
    try:
        info = check_sidecar(json.loads(files.sidecar.read_text()))
        if info.get("format") != FORMAT:
            raise ValueError(f"its format is not {FORMAT}")
    except (OSError, ValueError) as e:
        raise SidecarError(f"index sidecar {files.sidecar} is corrupt ({e}): {_fix(path, space)}") from None
    if info.get("generation", 0) != files.generation:
        raise IndexFileError(f"index {files.sidecar} changed while it was read: try again")
    for f, key in ((files.index, "bytes"), (files.rows, "rows_bytes")):
        if not f.exists():
            raise IndexFileError(f"index file {f} is missing: {_fix(path, space)}")
        if f.stat().st_size != info.get(key):
            raise IndexFileError(f"index file {f} is corrupt or from another build (size {f.stat().st_size}, "
                                 f"sidecar says {info.get(key)}): {_fix(path, space)}")
    try:
        index = faiss.read_index(str(files.index))
        state = np.load(files.rows, allow_pickle=False)
    except (RuntimeError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IndexFileError(f"index file {files.index} is corrupt ({msg}): {_fix(path, space)}") from None
    if index.ntotal != len(state) or len(state) != info.get("rows") or state.ndim != 2:
        raise IndexFileError(f"index file {files.index} holds {index.ntotal} vectors but {files.rows.name} lists "
                             f"{len(state)}: {_fix(path, space)}")
    if st is not None:
        sp = st.space(space)
        if info.get("weights_sha256") != sp.attrs.get("weights_sha256") or info.get("dim") != sp.dim:
            raise IndexFileError(f"index {files.index} was built for other vectors than space {space!r} now holds "
                                 f"(backbone weights or dimension differ): {_fix(path, space)}")
    try:
        check_params(index, info.get("params", {}))
        set_params(index, info.get("params", {}))
    except (ValueError, RuntimeError) as e:
        raise SidecarError(f"index sidecar {files.sidecar} does not fit its index ({faiss_message(e)}): "
                           f"{_fix(path, space)}") from None
    return LoadedIndex(index, info, state[:, 0].copy(), state[:, 1].copy(), files)


def _write_atomic(path: Path, write: Any) -> int:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
        return size
    finally:
        tmp.unlink(missing_ok=True)


def save_index(index: faiss.Index, rows: np.ndarray, fingerprints: np.ndarray, info: dict[str, Any],
               files: IndexFiles) -> dict[str, Any]:
    """Write a new generation (index, rows), switch the sidecar to it, remove the old one; returns
    the sidecar. Call it holding the build lock."""
    files.index.parent.mkdir(parents=True, exist_ok=True)
    new = index_files_at(files.sidecar).next_generation()  # the current one: read under the lock
    state = np.stack([rows, fingerprints], axis=1).astype(np.int64)
    info = {**info, "format": FORMAT, "generation": new.generation, "index_file": str(new.index)}
    info["bytes"] = _write_atomic(new.index, lambda p: faiss.write_index(index, p))
    info["rows_bytes"] = _write_atomic(new.rows, lambda p: _save_npy(p, state))
    _write_atomic(new.sidecar, lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n"))
    for stray in new.strays():
        stray.unlink(missing_ok=True)
    return info


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


@contextmanager
def _build_lock(files: IndexFiles) -> Iterator[None]:
    from ..store.locks import try_lock  # a kernel lock: a killed builder's lock file never blocks the next one

    files.lock.parent.mkdir(parents=True, exist_ok=True)
    held = try_lock(files.lock)
    if isinstance(held, str):
        raise StoreError(f"{files.index} is being built by {held}: wait for it to finish")
    try:
        yield
    finally:
        held.release()


# --------------------------------------------------------------------------- the store-level API


def build_index(store: str | os.PathLike | Store, *, space: str | None = None, kind: str = "auto",
                memory: str | int = "4G", target_recall: float = 0.95, device: str = "auto",
                rebuild: bool = False, n_queries: int = 500, seed: int = 0) -> dict[str, Any]:
    """Build, or bring up to date, the FAISS index of a store's embedding space; returns the sidecar.

    Args:
        store: the ``.h5`` store (path or open ``Store``).
        space: embedding space (default: the store's first frozen space).
        kind: ``auto``, ``flat``, ``hnsw``, ``ivf-flat``, ``ivf-pq``, ``ivf-pq-refine`` or a faiss
            factory string.
        memory: budget for the index in memory, e.g. ``"4G"`` (``auto`` and ``ivf-pq`` respect it).
        target_recall: recall@10 against exact search that nprobe / efSearch are tuned to reach.
        device: ``auto``, ``cpu`` or ``cuda`` (faiss's GPU build: ``pip install -e ".[gpu]"`` in a checkout).
        rebuild: build from scratch even when the index could be extended.
        n_queries: rows held out of the index while tuning (added afterwards).
        seed: seed of the training and held-out samples.

    With an index already there, only rows it lacks are added (see the module docstring); the
    sidecar's ``mode`` says what happened: ``full``, ``incremental`` or ``unchanged``.
    """
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], not {target_recall}")
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    with timed(stages, "open_store"):
        st = store if isinstance(store, Store) else open_store(store)
        sp = st.space(space)
    if not len(sp):
        raise StoreError(f"space {sp.name!r} of {st.path} has no vectors yet: run `embedstore embed` first")
    files = index_files(st.path, sp.name)
    dev = resolve_faiss_device(device)
    with _build_lock(files):
        with timed(stages, "fingerprint"):
            fps = vector_fingerprints(sp.vectors)
        factory = resolve_kind(kind, len(sp), sp.dim, memory)
        notes: list[str] = []
        old = None if rebuild else _previous(st, sp, factory, target_recall, notes)
        built, mode, added, removed = None, "full", len(sp), 0
        if old is not None:
            stale, fresh = _changes(old, sp, fps)
            if not len(stale) and not len(fresh):
                return {**old.info, "index_file": str(old.files.index), "space": sp.name,  # never a sidecar's path
                        "mode": "unchanged", "added": 0, "removed": 0, "notes": [],
                        "stages": {k: round(v, 3) for k, v in stages.items()}}
            if _remove(old, stale, stages, notes):
                built = _extend(old, factory, sp, fresh, target_recall, n_queries, seed, stages, notes)
                mode, added, removed = "incremental", len(fresh), len(stale)
        if built is None:
            held = held_out(len(sp), n_queries, seed)
            index = train_and_add(new_index(factory, sp.dim), sp.vectors, sp.rows,
                                  np.setdiff1d(np.arange(len(sp)), held), dev, stages, seed, notes)
            built = grow_and_tune(index, factory, sp.vectors, sp.rows, held[:0], held, target_recall, stages,
                                  notes, seed)
        info = {
            **built.report(),
            "space": sp.name,
            "backbone": sp.attrs.get("backbone"),
            "weights_sha256": sp.attrs.get("weights_sha256"),
            "dim": sp.dim,
            "metric": "cosine (inner product of L2-normalised vectors)",
            "target_recall": target_recall,
            "memory": format_size(parse_size(memory)),
            "device": dev,
            "mode": mode,
            "added": int(added),
            "removed": int(removed),
            "faiss": faiss.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with timed(stages, "save"):
            info = save_index(built.index, sp.rows, fps, info, files)
        info["stages"] = {k: round(v, 3) for k, v in stages.items()}
        info["build_seconds"] = round(time.perf_counter() - t0, 3)
        _write_atomic(files.sidecar, lambda p: Path(p).write_text(json.dumps(info, indent=2) + "\n"))
    return info


def _previous(st: Store, sp: Space, factory: str, target_recall: float, notes: list[str]) -> LoadedIndex | None:
    """The existing index when it can be extended, else None (with a note saying why)."""
    files = index_files(st.path, sp.name)
    if not files.sidecar.exists() and not files.index.exists():
        return None
    try:
        old = load_index(st, sp.name)
    except IndexFileError as e:
        notes.append(f"rebuilt: the previous index was unusable ({e})")
        return None
    if old.info.get("factory") != factory:
        notes.append(f"rebuilt: {factory} suits {len(sp)} rows (the previous index was {old.info.get('factory')})")
        return None
    if old.info.get("target_recall") != target_recall:
        notes.append(f"rebuilt: tuned for recall {target_recall} "
                     f"(the previous index for {old.info.get('target_recall')})")
        return None
    return old


def _changes(old: LoadedIndex, sp: Space, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indexed rows to remove: changed or gone, positions in the space to add: new or changed)."""
    known = dict(zip(old.rows.tolist(), old.fingerprints.tolist()))
    current = dict(zip(sp.rows.tolist(), fps.tolist()))
    stale = np.array([r for r, f in known.items() if current.get(r) != f], np.int64)
    fresh = np.flatnonzero([known.get(r) != f for r, f in current.items()]).astype(np.int64)
    return stale, fresh


def _remove(old: LoadedIndex, stale: np.ndarray, stages: dict[str, float], notes: list[str]) -> bool:
    """Remove ``stale`` ids from the index; False (with a note) when it must be rebuilt instead."""
    if not len(stale):
        return True
    try:
        with timed(stages, "remove"):
            removed = old.index.remove_ids(faiss.IDSelectorBatch(stale))
    except RuntimeError:
        notes.append(f"rebuilt: {len(stale)} indexed vectors changed or left the space, and "
                     f"{old.info.get('kind')} indexes cannot remove vectors")
        return False
    if removed != len(stale):
        notes.append(f"rebuilt: {len(stale)} vectors to remove, the index found {removed}")
        return False
    return True


def _extend(old: LoadedIndex, factory: str, sp: Space, fresh: np.ndarray, target_recall: float, n_queries: int,
            seed: int, stages: dict[str, float], notes: list[str]) -> BuiltIndex:
    """Add the fresh rows; re-tune on some of them when there are enough, else keep the parameters."""
    if len(fresh) >= 50:
        held = held_out(len(sp), n_queries, seed, among=fresh)
        return grow_and_tune(old.index, factory, sp.vectors, sp.rows, np.setdiff1d(fresh, held), held,
                             target_recall, stages, notes, seed)
    with timed(stages, "add"):
        add_rows(old.index, sp.vectors, sp.rows, fresh)
    notes.append(f"kept the tuned parameters and recall of the previous build: only {len(fresh)} rows were added")
    info = old.info
    tuning = Tuning(info.get("params", {}), info.get("recall_at_10", 0.0),
                    [tuple(c) for c in info.get("tuning_curve", [])], info.get("recall_queries", 0))
    with timed(stages, "latency"):
        latency = query_latency(old.index, normalized(sp.vectors, held_out(len(sp), 200, seed)))
    return BuiltIndex(old.index, factory, tuning, latency, stages, notes)
