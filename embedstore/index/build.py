"""Building a space's FAISS index: train and fill it, tune it, save it, and bring it up to date.

Cosine similarity throughout: vectors are L2-normalised float32 compared by inner product.
Index ids are store rows (``Space.rows``), so every hit maps straight back to the images table.
The choice of index is :mod:`.choose`, tuning :mod:`.tune`, the files and their generations
:mod:`.files`.

Incremental: ``build_index`` on a space that already has an index adds only the rows it lacks.
A row whose vector changed (its image file changed and was embedded again) or that left the
space is removed first (``remove_ids``); index types that cannot remove (HNSW, refined indexes)
are rebuilt instead, and so is an index whose layout would be chosen differently at the new size.

Crash safety: the index is built in memory under the space's build lock and published by
:func:`.files.save_index` (a new generation, then the sidecar switch), so a build killed at any
moment leaves the previous index whole and in use.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from ..errors import IndexBuildError, IndexFileError, StoreError
from ..store import Space, Store, open_store
from ..utils import format_size, timed
from .checks import faiss_message
from .choose import DEFAULT_MEMORY, check_memory, kind_name, new_index, resolve_kind
from .files import LoadedIndex, build_lock, index_files, load_built_index, save_index, write_sidecar
from .gpu import resolve_faiss_device, to_gpu
from .tune import Tuning, held_out, query_latency, true_neighbours, tune
from .vectors import iter_chunks, normalized, vector_fingerprints


def check_target(target_recall: float) -> None:
    """IndexBuildError unless ``target_recall`` is in (0, 1]."""
    if not 0 < target_recall <= 1:
        raise IndexBuildError(f"target recall must be in (0, 1], not {target_recall}: e.g. 0.95")


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
        work, gpu_res = to_gpu(index, notes if notes is not None else [])
    if not work.is_trained:
        with timed(stages, "train"):
            sample = np.sort(np.random.default_rng(seed).choice(n, _train_size(index, n), replace=False))
            try:
                work.train(normalized(vectors, sample))
            except RuntimeError as e:  # a layout check_trainable does not know
                raise IndexBuildError(f"faiss could not train this index kind on {len(sample)} vectors "
                                      f"({faiss_message(e)}): choose --kind auto or flat, fewer lists, "
                                      "or embed more images") from None
    with timed(stages, "add"):
        reserve(work, n)
        add_rows(work, vectors, ids, positions)
    if gpu_res is not None and work is not index:
        index = faiss.index_gpu_to_cpu(work)
    return index


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


def index_vectors(vectors: Any, ids: np.ndarray | None = None, *, kind: str = "auto", memory: int = DEFAULT_MEMORY,
                  target_recall: float = 0.95, device: str = "auto", n_queries: int = 500,
                  seed: int = 0) -> BuiltIndex:
    """Build and tune an index over an (n, dim) array-like (numpy, h5py, ...) without a store.

    Args:
        vectors: rows to index; read in chunks and L2-normalised on the way in.
        ids: int64 id of each row (default 0..n-1).
        kind: ``auto``, ``flat``, ``hnsw``, ``ivf-flat``, ``ivf-pq``, ``ivf-pq-refine`` or a faiss
            factory string.
        memory: index memory budget in bytes, e.g. ``4 * 2**30`` (``utils.parse_size("4G")``);
            ``auto`` and ``ivf-pq`` stay within it.
        target_recall: recall@10 that tuning aims for.
        device: ``auto`` (GPU when faiss's GPU build sees one), ``cpu`` or ``cuda``.
        n_queries: rows held out of the index while tuning (then added), for recall and latency.
        seed: seed of the training and held-out samples.
    """
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if len(ids) != n:
        raise IndexBuildError(f"{len(ids)} ids for {n} vectors: give one id per row, or none for 0..{n - 1}")
    check_target(target_recall)
    stages: dict[str, float] = {}
    notes: list[str] = []
    factory = resolve_kind(kind, n, dim, memory)
    return build_new(factory, vectors, ids, resolve_faiss_device(device), target_recall, n_queries, seed, stages,
                     notes)


def build_new(factory: str, vectors: Any, ids: np.ndarray, device: str, target_recall: float, n_queries: int,
              seed: int, stages: dict[str, float], notes: list[str]) -> BuiltIndex:
    """A new ``factory`` index over every row: trained and filled without the held-out rows, tuned on
    them, then given them too."""
    n, dim = len(ids), vectors.shape[1]
    held = held_out(n, n_queries, seed)
    index = train_and_add(new_index(factory, dim), vectors, ids, np.setdiff1d(np.arange(n), held), device, stages,
                          seed, notes)
    return grow_and_tune(index, factory, vectors, ids, held[:0], held, target_recall, stages, notes, seed)


def build_index(store: str | os.PathLike | Store, *, space: str | None = None, kind: str = "auto",
                memory: int = DEFAULT_MEMORY, target_recall: float = 0.95, device: str = "auto",
                rebuild: bool = False, n_queries: int = 500, seed: int = 0) -> dict[str, Any]:
    """Build, or bring up to date, the FAISS index of a store's embedding space; returns the sidecar.

    Args:
        store: the ``.h5`` store (path or open ``Store``).
        space: embedding space (default: the store's first frozen space).
        kind: ``auto``, ``flat``, ``hnsw``, ``ivf-flat``, ``ivf-pq``, ``ivf-pq-refine`` or a faiss
            factory string.
        memory: budget for the index in memory, in bytes (``utils.parse_size("4G")``; ``auto`` and
            ``ivf-pq`` respect it).
        target_recall: recall@10 against exact search that nprobe / efSearch are tuned to reach.
        device: ``auto``, ``cpu`` or ``cuda`` (faiss's GPU build: ``pip install -e ".[gpu]"`` in a checkout).
        rebuild: build from scratch even when the index could be extended.
        n_queries: rows held out of the index while tuning (added afterwards).
        seed: seed of the training and held-out samples.

    With an index already there, only rows it lacks are added (see the module docstring); the
    sidecar's ``mode`` says what happened: ``full``, ``incremental`` or ``unchanged``.
    """
    check_target(target_recall)
    memory = check_memory(memory)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    with timed(stages, "open_store"):
        st = store if isinstance(store, Store) else open_store(store)
        sp = st.space(space)
    if not len(sp):
        raise StoreError(f"space {sp.name!r} of {st.path} has no vectors yet: run `embedstore embed` first")
    files = index_files(st.path, sp.name)
    dev = resolve_faiss_device(device)
    with build_lock(files):
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
            built = build_new(factory, sp.vectors, sp.rows, dev, target_recall, n_queries, seed, stages, notes)
        info = {
            **built.report(),
            "space": sp.name,
            "backbone": sp.attrs.get("backbone"),
            "weights_sha256": sp.attrs.get("weights_sha256"),
            "dim": sp.dim,
            "metric": "cosine (inner product of L2-normalised vectors)",
            "target_recall": target_recall,
            "memory": format_size(memory),
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
        write_sidecar(files, info)
    return info


def _previous(st: Store, sp: Space, factory: str, target_recall: float, notes: list[str]) -> LoadedIndex | None:
    """The existing index when it can be extended, else None (with a note saying why)."""
    try:
        old = load_built_index(st, sp.name)
    except IndexFileError as e:
        notes.append(f"rebuilt: the previous index was unusable ({e})")
        return None
    if old is None:
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
