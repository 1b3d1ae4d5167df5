"""Building a space's FAISS index: train and fill it, tune it, save it, and bring it up to date.

Cosine similarity throughout: vectors are L2-normalised float32 compared by inner product.
Index ids are store rows (``Space.rows``), so every hit maps straight back to the images table.
The choice of index is :mod:`.choose`, the memory budget :mod:`.budget`, filling and tuning
:mod:`.fill` and :mod:`.tune`, re-ranking from the stored vectors :mod:`.rerank`, the files and
their generations :mod:`.files`.

Streaming: the vectors are never copied whole. Training reads a sample (``vectors[sorted
positions]``), adding reads ``vectors[a:b]`` a chunk at a time, each normalised on its own; the
sample and chunk sizes come from the whole-process ``memory`` budget (:mod:`.budget`).

Incremental: ``build_index`` on a space that already has an index adds only the rows it lacks.
The sidecar records the store's uuid and the space's generation, and ``rows.npy`` the version
(``Space.versions``) of each indexed vector: an indexed row that left the space or whose version
grew is removed first (``remove_ids``), and the positions whose version is newer than the
recorded generation, or whose row is not indexed, are added. Index types that cannot remove
(HNSW, refined indexes) are rebuilt instead, and so is an index whose layout would be chosen
differently at the new size, one of another store, or one from before generations were recorded.

Crash safety: the index is built in memory under the space's build lock and published by
:func:`.files.save_index` (a new generation, then the sidecar switch), so a build killed at any
moment leaves the previous index whole and in use.
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable

import faiss
import numpy as np

from ..errors import IndexBuildError, IndexFileError, StoreError
from ..store import Space, Store, open_store
from ..utils import format_size, timed
from .budget import BuildPlan, plan_build, process_rss
from .checks import check_trainable
from .choose import DEFAULT_MEMORY, auto_candidates, check_memory, new_index, pq_codes, resolve_kind
from .files import LoadedIndex, build_lock, index_files, index_is_current, load_built_index, save_index, write_sidecar
from .fill import (RERANK_NOTE, BuiltIndex, add_rows, check_target, grow_and_tune, repeats, reserve,  # noqa: F401
                   train_and_add)
from .gpu import resolve_faiss_device
from .rerank import id_positions, rerank
from .tune import Rerank, Tuning, held_out, query_latency, searcher
from .vectors import normalized

def choose_build(kind: str, n: int, dim: int, itemsize: int, memory: int,
                 rss: int | None = None) -> tuple[str, bool, BuildPlan]:
    """(factory, re-ranked from the stored vectors, memory plan) of a ``kind`` over n vectors.

    ``auto`` and ``ivf-pq`` take the first of their candidates (:func:`.choose.auto_candidates`,
    :func:`.choose.pq_codes`) whose index, training sample and chunk fit the budget beside the
    process's resident memory; other kinds must fit it as they are.
    """
    rss = process_rss() if rss is None else rss
    if kind not in ("auto", "ivf-pq"):
        factory = resolve_kind(kind, n, dim, memory)
        return factory, False, plan_build(factory, n, dim, itemsize, memory, rss)
    options = auto_candidates(n, dim) if kind == "auto" else [(f, False) for f in pq_codes(n, dim)]
    error: IndexBuildError | None = None
    for factory, reranked in options:
        try:
            plan = plan_build(factory, n, dim, itemsize, memory, rss)
        except IndexBuildError as e:
            error = e  # the last is the smallest build: its numbers are the ones to report
            continue
        check_trainable(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT), factory, kind, n)
        return factory, reranked, plan
    raise error  # type: ignore[misc]  # options is never empty


def _rerank_fn(vectors: Any, ids: np.ndarray, on: bool,
               positions_of: Callable[[np.ndarray], np.ndarray] | None = None) -> Rerank | None:
    if not on:
        return None
    where = positions_of or id_positions(ids)
    return lambda q, cand, k: rerank(vectors, where, q, cand, k)


def index_vectors(vectors: Any, ids: np.ndarray | None = None, *, kind: str = "auto", memory: int = DEFAULT_MEMORY,
                  target_recall: float = 0.95, device: str = "auto", n_queries: int = 500,
                  seed: int = 0) -> BuiltIndex:
    """Build and tune an index over an (n, dim) array-like (numpy, h5py, ...) without a store.

    Args:
        vectors: rows to index; read in chunks and L2-normalised on the way in.
        ids: int64 id of each row (default 0..n-1).
        kind: ``auto``, ``flat``, ``hnsw``, ``ivf-flat``, ``ivf-pq``, ``ivf-pq-refine`` or a faiss
            factory string.
        memory: memory budget of the whole process in bytes, e.g. ``4 * 2**30``
            (``utils.parse_size("4G")``), see :mod:`.budget`.
        target_recall: recall@10 that tuning aims for.
        device: ``auto`` (GPU when faiss's GPU build sees one), ``cpu`` or ``cuda``.
        n_queries: rows held out of the index while tuning (then added), for recall and latency.
        seed: seed of the training and held-out samples.

    ``auto`` over many rows re-ranks from ``vectors``: search with ``BuiltIndex.search``.
    """
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if len(ids) != n:
        raise IndexBuildError(f"{len(ids)} ids for {n} vectors: give one id per row, or none for 0..{n - 1}")
    check_target(target_recall)
    memory = check_memory(memory)
    stages: dict[str, float] = {}
    notes: list[str] = []
    with timed(stages, "plan"):
        factory, reranked, plan = choose_build(kind, n, dim, np.dtype(vectors.dtype).itemsize, memory)
    return build_new(factory, vectors, ids, resolve_faiss_device(device), target_recall, n_queries, seed, stages,
                     notes, plan, _rerank_fn(vectors, ids, reranked))


def build_new(factory: str, vectors: Any, ids: np.ndarray, device: str, target_recall: float, n_queries: int,
              seed: int, stages: dict[str, float], notes: list[str], plan: BuildPlan,
              rerank_fn: Rerank | None = None) -> BuiltIndex:
    """A new ``factory`` index over every row: trained and filled without the held-out rows, tuned on
    them, then given them too."""
    n, dim = len(ids), vectors.shape[1]
    held = held_out(n, n_queries, seed)
    index = train_and_add(new_index(factory, dim), vectors, ids, held, device, stages, plan, seed, notes)
    built = grow_and_tune(index, factory, vectors, ids, held[:0], held, target_recall, stages, notes, seed,
                          rerank_fn, plan.chunk_rows)
    built.plan = plan
    return built


def build_index(store: str | os.PathLike | Store, *, space: str | None = None, kind: str = "auto",
                memory: int = DEFAULT_MEMORY, target_recall: float = 0.95, device: str = "auto",
                rebuild: bool = False, n_queries: int = 500, seed: int = 0) -> dict[str, Any]:
    """Build, or bring up to date, the FAISS index of a store's embedding space; returns the sidecar.

    Args:
        store: the ``.h5`` store (path or open ``Store``).
        space: embedding space (default: the store's first frozen space).
        kind: ``auto``, ``flat``, ``hnsw``, ``ivf-flat``, ``ivf-pq``, ``ivf-pq-refine`` or a faiss
            factory string.
        memory: memory budget of the whole build process in bytes (``utils.parse_size("8G")``):
            its resident memory + the index + the training sample + one chunk (:mod:`.budget`).
        target_recall: recall@10 against exact search that nprobe / efSearch / k_factor are tuned to reach.
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
        with timed(stages, "plan"):
            factory, reranked, plan = choose_build(kind, len(sp), sp.dim, np.dtype(sp.vectors.dtype).itemsize, memory)
        notes: list[str] = []
        old = None if rebuild else _previous(st, sp, factory, reranked, target_recall, notes)
        if old is not None and index_is_current(st, sp, old):
            return {**old.info, "index_file": str(old.files.index), "space": sp.name,  # never a sidecar's path
                    "mode": "unchanged", "added": 0, "removed": 0, "notes": [],
                    "stages": {k: round(v, 3) for k, v in stages.items()}}
        rerank_fn = _rerank_fn(sp.vectors, sp.rows, reranked)
        built, mode, added, removed = None, "full", len(sp), 0
        if old is not None:
            with timed(stages, "changes"):
                stale, fresh = _changes(old, sp)
            if _worth_extending(old, stale, notes) and _remove(old, stale, stages, notes):
                built = _extend(old, factory, sp, fresh, target_recall, n_queries, seed, stages, notes, rerank_fn,
                                plan.chunk_rows)
                mode, added, removed = "incremental", len(fresh), len(stale)
            del old
        if built is None:
            built = build_new(factory, sp.vectors, sp.rows, dev, target_recall, n_queries, seed, stages, notes, plan,
                              rerank_fn)
        info = {
            **built.report(),
            "space": sp.name,
            "backbone": sp.attrs.get("backbone"),
            "weights_sha256": sp.attrs.get("weights_sha256"),
            "dim": sp.dim,
            "metric": "cosine (inner product of L2-normalised vectors)",
            "target_recall": target_recall,
            "memory": format_size(memory),
            "memory_plan": plan.describe(),
            "device": dev,
            "mode": mode,
            "added": int(added),
            "removed": int(removed),
            "store_uuid": st.uuid,
            "space_generation": int(sp.generation),
            "faiss": faiss.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with timed(stages, "save"):
            info = save_index(built.index, np.asarray(sp.rows), _versions(sp), info, files)
        info["stages"] = {k: round(v, 3) for k, v in stages.items()}
        info["build_seconds"] = round(time.perf_counter() - t0, 3)
        info["peak_rss"] = format_size(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        write_sidecar(files, info)
    return info


def _versions(sp: Space) -> np.ndarray:
    return np.zeros(len(sp), np.int64) if sp.versions is None else np.asarray(sp.versions, np.int64)


def _previous(st: Store, sp: Space, factory: str, reranked: bool, target_recall: float,
              notes: list[str]) -> LoadedIndex | None:
    """The existing index when it can be extended (read whole unless it is current), else None
    (with a note saying why)."""
    try:
        old = load_built_index(st, sp.name)  # memory-mapped: an unchanged index costs no read
    except IndexFileError as e:
        notes.append(f"rebuilt: the previous index was unusable ({e})")
        return None
    if old is None:
        return None
    info = old.info
    if info.get("space_generation") is None:
        notes.append("rebuilt: the previous index was built before store generations were recorded")
        return None
    if info.get("store_uuid") != st.uuid:
        notes.append(f"rebuilt: the previous index was built for another store (uuid {info.get('store_uuid')!r}, "
                     f"this store is {st.uuid!r})")
        return None
    if info.get("factory") != factory or bool(info.get("rerank")) != reranked:
        notes.append(f"rebuilt: {factory} suits {len(sp)} rows (the previous index was {info.get('factory')})")
        return None
    if info.get("target_recall") != target_recall:
        notes.append(f"rebuilt: tuned for recall {target_recall} (the previous index for {info.get('target_recall')})")
        return None
    if index_is_current(st, sp, old):
        return old
    try:
        return load_built_index(st, sp.name, mmap=False)  # to be extended: in memory
    except IndexFileError as e:
        notes.append(f"rebuilt: the previous index was unusable ({e})")
        return None


def _changes(old: LoadedIndex, sp: Space) -> tuple[np.ndarray, np.ndarray]:
    """(indexed rows to remove: gone, or whose version grew; positions in the space to add: newer
    than the indexed generation, or not indexed)."""
    generation = int(old.info["space_generation"])
    versions = _versions(sp)
    pos = sp.positions_of(np.asarray(old.rows))
    here = pos >= 0
    grown = np.zeros(len(pos), bool)
    grown[here] = versions[pos[here]] > np.asarray(old.versions)[here]
    stale_mask = ~here | grown
    indexed = np.zeros(len(sp), bool)
    indexed[pos[here & ~grown]] = True
    fresh = np.flatnonzero(~indexed | (versions > generation)).astype(np.int64)
    return np.asarray(old.rows)[stale_mask].astype(np.int64), fresh


def _worth_extending(old: LoadedIndex, stale: np.ndarray, notes: list[str]) -> bool:
    """False (with a note) when most indexed vectors are stale: a rebuild costs less."""
    if len(stale) * 2 > max(1, len(old.rows)):
        notes.append(f"rebuilt: {len(stale)} of {len(old.rows)} indexed vectors changed or left the space")
        return False
    return True


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
            seed: int, stages: dict[str, float], notes: list[str], rerank_fn: Rerank | None,
            chunk: int) -> BuiltIndex:
    """Add the fresh rows; re-tune on some of them when there are enough, else keep the parameters."""
    if len(fresh) >= 50:
        held = held_out(len(sp), n_queries, seed, among=fresh)
        return grow_and_tune(old.index, factory, sp.vectors, sp.rows, np.setdiff1d(fresh, held), held,
                             target_recall, stages, notes, seed, rerank_fn, chunk)
    with timed(stages, "add"):
        add_rows(old.index, sp.vectors, sp.rows, fresh, chunk=chunk)
    notes.append(f"kept the tuned parameters and recall of the previous build: only {len(fresh)} rows were added")
    info = old.info
    tuning = Tuning(info.get("params", {}), info.get("recall_at_10", 0.0),
                    [tuple(c) for c in info.get("tuning_curve", [])], info.get("recall_queries", 0))
    with timed(stages, "latency"):
        latency = query_latency(searcher(old.index, tuning.params, rerank_fn),
                                normalized(sp.vectors, held_out(len(sp), 200, seed)), repeats=repeats(rerank_fn))
    return BuiltIndex(old.index, factory, tuning, latency, stages, notes, rerank_fn)
