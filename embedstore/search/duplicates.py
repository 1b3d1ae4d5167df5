"""Near-duplicate groups: connected components of a space's k-NN graph cut at a cosine threshold.

The graph is built in batches of query rows through the space's index (exact k-NN without one, up
to DUPLICATES_EXACT_MAX rows) on all cores, reading the next vectors while faiss searches the
current ones; memory stays O(n * k). An index whose candidates are re-ranked from the stored
vectors is searched several batches at a time, as many as one re-rank pass holds
(``index.rerank.queries_per_pass``): their candidates cover the whole space, so one
sequential read of the vectors scores them all. Each batch is cached on disk (:mod:`.graph`) as
soon as its search is done, so a killed run resumes where it stopped and another threshold only
recomputes the components.

Crash safety: writes only the k-NN graph cache, every file atomically (see :mod:`.graph`); the
store and the index are only read. A kill at any moment leaves whole batch files that the next run
reuses; it loses at most the batches of the search in flight (one re-rank pass).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Iterator

import faiss
import numpy as np

from ..choices import DUPLICATES_THRESHOLD
from ..errors import IndexFileError, QueryError
from ..index.files import index_files
from ..index.rerank import queries_per_pass, rerank_width, search_index
from ..index.tune import omp_threads
from ..index.vectors import iter_chunks, normalized
from ..store import Space, Store
from ..utils import timed
from .graph import BATCH, GraphCache, open_cache, threads
from .query import _index_or_none, _open

DUPLICATES_EXACT_MAX = 20_000  # duplicates without an index: exact k-NN up to this many rows

Searcher = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def duplicates(store: str | os.PathLike | Store, *, threshold: float = DUPLICATES_THRESHOLD, k: int = 10,
               space: str | None = None, cache: bool = True, batch: int = BATCH) -> dict[str, Any]:
    """Groups of near-duplicate images: connected components of the k-NN graph cut at ``threshold``.

    Each vector's k nearest neighbours come from the space's index (exact k-NN without one, up to
    DUPLICATES_EXACT_MAX rows); pairs at cosine >= threshold are edges. Memory is O(n * k), never
    n x n. An approximate index can miss a pair its recall misses; a group still forms when the
    images are linked through other members.

    The graph is kept in ``STORE.h5.index/<space>.knn-<k>-g<generation>/`` (``cache=False``: not
    read nor written): a run killed part-way resumes from the batches it finished, and a run with
    another threshold reuses the whole graph. A change to the space starts a new graph; the old one
    is removed once the new one is complete. ``batch``: query rows searched (and saved) at a time.

    Returns ``{"groups": [{"size", "min_score", "members": [{"path", "row", "label"}, ...]}, ...],
    "threshold", "k", "images", "in_groups", "space", "exact", "notes", "stages", "knn_cache"}``;
    ``knn_cache`` says where the graph is and how many of its batches were reused or computed.
    """
    if not -1 <= threshold <= 1:
        raise QueryError(f"threshold is a cosine similarity in [-1, 1], not {threshold}")
    if k < 1:
        raise QueryError(f"k must be at least 1, not {k}")
    if batch < 1:
        raise QueryError(f"batch must be at least 1 row, not {batch}")
    stages: dict[str, float] = {}
    notes: list[str] = []
    with timed(stages, "open_store"):
        st, sp = _open(store, space)
    n = len(sp)
    if k >= n:
        notes.append(f"k={k}: the space holds {n} images, so each is compared with all {max(0, n - 1)} others")
    info, batches = knn_graph(st, sp, k, cache=cache, batch=batch, stages=stages, notes=notes)
    src_parts, dst_parts, sim_parts = [], [], []
    for s, found, scores in batches:
        own = sp.rows[s][:, None]
        keep = (scores >= threshold) & (found >= 0) & (found != own)
        src_parts.append(np.broadcast_to(np.arange(s.start, s.stop)[:, None], keep.shape)[keep])
        dst_parts.append(found[keep])
        sim_parts.append(scores[keep])
    with timed(stages, "components"):
        groups = _components(sp, src_parts, dst_parts, sim_parts)
    return {
        "groups": groups,
        "threshold": threshold,
        "k": k,
        "images": n,
        "in_groups": int(sum(g["size"] for g in groups)),
        "space": sp.name,
        "exact": bool(info.get("exact", True)),
        "notes": notes,
        "stages": {key: round(v, 4) for key, v in stages.items()},
        "knn_cache": info,
    }


def knn_graph(st: Store, sp: Space, k: int, *, cache: bool = True, batch: int = BATCH,
              stages: dict[str, float] | None = None,
              notes: list[str] | None = None) -> tuple[dict[str, Any], Iterator[tuple[slice, np.ndarray, np.ndarray]]]:
    """The space's k-NN graph as :func:`duplicates` builds and caches it: ``(info, batches)``.

    Each batch is ``(positions, neighbours, scores)``: a slice of the space's positions, and for each
    of them its ``min(k + 1, n)`` nearest store rows (-1 = none; the row itself usually among them)
    and their cosine similarities, best first. ``info`` says where the graph is cached and how many
    batches were reused or computed (filled in as the batches are read). Memory: one batch at a time.
    """
    stages = {} if stages is None else stages
    notes = [] if notes is None else notes
    n = len(sp)
    kk = min(k + 1, n)
    graph = _cache(st, sp, k, kk, batch, cache, notes)
    info = {"folder": None if graph is None else str(graph.folder), "batches": -(-n // batch), "batch": batch,
            "reused": 0, "computed": 0}
    return info, _graph(st, sp, kk, graph, info, stages, notes)


def _cache(st: Store, sp: Space, k: int, kk: int, batch: int, wanted: bool,
           notes: list[str]) -> GraphCache | None:
    if not wanted or not len(sp):
        return None
    if not st.uuid:
        notes.append(f"{st.path} predates store identities: the k-NN graph is not cached")
        return None
    return open_cache(st, sp, k, kk, batch)


def _source_name(st: Store, sp: Space) -> str:
    """The graph source an index would give, from its sidecar alone (no index read)."""
    files = index_files(st.path, sp.name)
    return f"index-{files.generation}" if files.sidecar.exists() else "exact"


def _graph(st: Store, sp: Space, kk: int, graph: GraphCache | None, info: dict[str, Any],
           stages: dict[str, float], notes: list[str]) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(positions, neighbour rows, scores) per batch: read back from the cache where it holds them,
    computed (and saved) for the rest."""
    n = len(sp)
    if graph is not None and n:
        for source in {_source_name(st, sp), "exact"}:  # a graph from exact search is good whatever the index
            if graph.usable(source) and len(graph.done()) == graph.batches:
                damaged: list[int] = []
                yield from _cached(graph, range(graph.batches), info, stages, damaged)
                if not damaged:
                    info["exact"] = source == "exact"
                    return
                break  # a damaged file: its batches are computed below, with the source there is now
    with timed(stages, "load_index"):
        searcher, source, per_search = _searcher(st, sp, kk, info["batch"], notes)
    info["exact"] = source == "exact"
    todo = list(range(info["batches"]))
    if graph is not None and info["reused"]:
        todo = damaged  # the rest of a complete graph was read above
        if not graph.usable(source):
            graph = None  # never mix sources in one cache: these batches are not saved
    elif graph is not None:
        try:
            graph.start(source)
        except OSError as e:
            notes.append(f"the k-NN graph is not cached ({graph.folder} cannot be written: {e})")
            graph, info["folder"] = None, None
        else:
            damaged = []
            yield from _cached(graph, graph.done(), info, stages, damaged)
            done = set(graph.done()) - set(damaged)
            todo = [b for b in todo if b not in done]
    yield from _computed(sp, kk, searcher, per_search, graph, todo, info, stages, notes)
    if graph is not None and len(graph.done()) == graph.batches:
        graph.complete()


def _cached(graph: GraphCache, batches: Any, info: dict[str, Any], stages: dict[str, float],
            damaged: list[int]) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """The batches read back from the cache; those that cannot be read go to ``damaged``."""
    for b in batches:
        with timed(stages, "read_graph"):
            got = graph.load(b)
        if got is None:
            damaged.append(b)
            continue
        info["reused"] += 1
        yield graph.span(b), got[0], got[1]


def _computed(sp: Space, kk: int, searcher: Searcher, per_search: int, graph: GraphCache | None, todo: list[int],
              info: dict[str, Any], stages: dict[str, float],
              notes: list[str]) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Search the batches in ``todo`` on all cores, ``per_search`` batches in one search, reading the
    next ones while these are searched; each batch is saved as soon as its search is done."""
    if not todo:
        return
    n, batch = len(sp), info["batch"]
    span = lambda b: slice(b * batch, min(n, (b + 1) * batch))  # noqa: E731
    searches = [todo[i : i + per_search] for i in range(0, len(todo), per_search)]

    def read(batches: list[int]) -> np.ndarray:
        out = np.empty((sum(span(b).stop - span(b).start for b in batches), sp.dim), np.float32)
        at = 0
        for b in batches:
            queries = normalized(sp.vectors, span(b))
            out[at : at + len(queries)] = queries
            at += len(queries)
        return out

    with ThreadPoolExecutor(1) as reader, omp_threads(threads()):
        ahead = reader.submit(read, searches[0])
        for i, batches in enumerate(searches):
            with timed(stages, "knn_graph"):
                queries = ahead.result()
                if i + 1 < len(searches):
                    ahead = reader.submit(read, searches[i + 1])
                scores, found = searcher(queries, kk)
                del queries
            at = 0
            for b in batches:
                s = span(b)
                m = s.stop - s.start
                rows, sims = found[at : at + m], scores[at : at + m]
                at += m
                if graph is not None:
                    with timed(stages, "save_graph"):
                        try:
                            graph.save(b, rows, sims)
                        except OSError as e:
                            notes.append(f"the k-NN graph is not cached ({graph.folder} cannot be written: {e})")
                            graph, info["folder"] = None, None
                info["computed"] += 1
                yield s, rows, sims


def _searcher(st: Store, sp: Space, kk: int, batch: int, notes: list[str]) -> tuple[Searcher, str, int]:
    """How the batches find their neighbours (store rows), the graph source that names it, and how
    many batches one search takes (those one re-rank pass serves; else one)."""
    n = len(sp)
    index = _index_or_none(st, sp, notes, stale_ok=n > DUPLICATES_EXACT_MAX)
    if index is not None:
        width = rerank_width(index, kk)
        per_search = max(1, queries_per_pass(sp.dim, width) // batch) if width else 1
        return partial(search_index, index, sp), f"index-{index.files.generation}", per_search
    if n > DUPLICATES_EXACT_MAX:
        raise IndexFileError(f"finding duplicates among {n} vectors needs an index: run "
                             f"`embedstore index {st.path} --space {sp.name}` first")
    flat = faiss.IndexFlatIP(sp.dim)
    for s in iter_chunks(n):
        flat.add(normalized(sp.vectors, s))
    rows = sp.rows

    def search(queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        scores, found = flat.search(queries, kk)
        return scores, np.where(found >= 0, rows[np.maximum(found, 0)], -1)

    return search, "exact", 1


# --------------------------------------------------------------------------- components


def _components(sp: Space, src: list[np.ndarray], dst: list[np.ndarray], sim: list[np.ndarray]) -> list[dict[str, Any]]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(sp)
    src_a = np.concatenate(src) if src else np.empty(0, np.int64)
    dst_pos = sp.positions_of(np.concatenate(dst)) if dst else np.empty(0, np.int64)
    sims = np.concatenate(sim) if sim else np.empty(0, np.float32)
    valid = dst_pos >= 0  # a stale index may return rows the space no longer has
    src_a, dst_pos, sims = src_a[valid], dst_pos[valid], sims[valid]
    graph = coo_matrix((np.ones(len(src_a), np.int8), (src_a, dst_pos)), shape=(n, n)).tocsr()
    _, comp = connected_components(graph, directed=False)
    return _groups(sp, comp, src_a, sims)


def _groups(sp: Space, comp: np.ndarray, src: np.ndarray, sims: np.ndarray) -> list[dict[str, Any]]:
    """Components of two or more, largest first; paths and labels read for their members only."""
    sizes = np.bincount(comp) if len(comp) else np.empty(0, np.int64)
    lowest = np.ones(len(sizes))
    np.minimum.at(lowest, comp[src], sims)
    big = np.flatnonzero(sizes > 1)
    order = np.argsort(comp, kind="stable")
    starts = np.searchsorted(comp[order], big)  # comp[order] is sorted: positions of each component
    members = [order[b : b + sizes[c]] for b, c in zip(starts, big)]
    every = np.concatenate(members) if members else np.empty(0, np.int64)
    paths, labels = sp.column("path", every), sp.column("label", every)
    rows = sp.rows[every]
    out, at = [], 0
    for m, c in zip(members, big):
        out.append({"size": int(len(m)), "min_score": round(float(lowest[c]), 6),
                    "members": [{"path": str(paths[i]), "row": int(rows[i]), "label": str(labels[i])}
                                for i in range(at, at + len(m))]})
        at += len(m)
    out.sort(key=lambda g: (-g["size"], g["members"][0]["row"]))
    return out
