"""Similarity search over a store's embedding space.

Queries are images (embedded with the space's own backbone and preprocessing, refused when the
weights differ from the recorded checksum), texts (a CLIP space's text tower), store rows, stored
paths or vectors. With an up-to-date index
(``embedstore index``) the search is approximate at the recall it was tuned for; without one it is
exact, and the result says so. An index the store moved past (rows added or written again since it
was built) still answers for what it holds; the rest is searched exactly and merged, with a note. Scores are cosine
similarities. A query reads only what it touches: its own vectors, the index, and the columns of
the k hits; torch and timm are imported for image and text queries only.

Crash safety: reads the store and the index only; nothing here writes a file. An index that a
build replaces while it is read is read again at its new generation (``index.files.load_index``).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import faiss
import numpy as np

from .._vectors import l2_normalize
from ..backbones.registry import has_backbone
from ..errors import NotFoundError, QueryError, SidecarError
from ..index.files import LoadedIndex, index_is_current, load_built_index, unindexed_positions
from ..index.rerank import search_index
from ..index.tune import omp_threads
from ..index.vectors import exact_knn, normalized
from ..store import Space, Store, open_store
from ..utils import timed
from .rows import WHERE_KEYS, check_where, filter_positions, parse_where, self_rows, stored_rows  # noqa: F401 (API)

FILTER_EXACT_MAX = 100_000  # filtered queries over at most this many rows are answered exactly


# --------------------------------------------------------------------------- queries


def embed_images(space: Space, images: Sequence[str], device: str = "auto",
                 batch_size: int = 32) -> tuple[np.ndarray, list[str | None]]:
    """Embed images with the space's backbone; (normalised vectors, error or None per image).

    Raises ``BackboneError`` when this machine's weights differ from the ones that built the space.
    """
    check_has_backbone(space)
    from ..backbones.load import load_space_backbone  # torch and timm: only image queries need them
    from ..data.collection import ImageItem
    from ..embedding.embedder import Embedder, embed_items

    embedder = Embedder(load_space_backbone(space.attrs), device=device)
    vectors, results = embed_items([ImageItem(p, p) for p in images], embedder, batch_size, workers=0)
    errors: list[str | None] = [None] * len(images)
    for r in results:
        if r.error:
            errors[r.index] = f"{r.error}: {r.message}"
    return l2_normalize(np.nan_to_num(vectors, nan=0.0)), errors


def check_has_backbone(space: Space) -> None:
    """QueryError for a space of imported vectors: no backbone of this store made them."""
    if not has_backbone(space.attrs):
        raise QueryError(f"space {space.name!r} holds vectors imported from {space.attrs['imported_from']}: "
                         "there is no backbone to embed query images with; query it by stored row (--row), "
                         "stored path (--path) or vectors of the same model (search(..., vectors=...))")


def row_positions(space: Space, rows: Sequence[int]) -> np.ndarray:
    """Positions in the space of store rows, refusing rows the space lacks."""
    pos = space.positions_of(np.asarray(rows, np.int64))
    if (pos < 0).any():
        bad = int(np.asarray(rows, np.int64)[np.flatnonzero(pos < 0)[0]])
        raise NotFoundError(f"row {bad} is not in space {space.name!r}: rows are the store's image rows "
                         "(see `embedstore search --json` output or the images table)")
    return pos


def path_rows(store: Store, paths: Sequence[str]) -> list[int]:
    """Store rows of stored paths (as stored, or absolute paths inside the store's root)."""
    rows = stored_rows(store, paths)
    for p, row in zip(paths, rows):
        if row < 0:
            raise NotFoundError(f"{p} is not in {store.path}: give a path as stored (relative to {store.root}) "
                             "or use --query to embed a new image")
    return [int(r) for r in rows]


# --------------------------------------------------------------------------- searching


def _open(store: str | os.PathLike | Store, space: str | None) -> tuple[Store, Space]:
    st = store if isinstance(store, Store) else open_store(store)
    return st, st.space(space)


def _index_or_none(st: Store, sp: Space, notes: list[str], stale_ok: bool = False) -> LoadedIndex | None:
    """The space's index, None (with a note) when none was built or, unless ``stale_ok``, when the
    store changed since it was built (``index_is_current``: store identity, space generation and
    row count, no vector read); corrupt files raise. ``stale_ok``: a stale index is returned, and
    :func:`search` searches the rows it lacks exactly."""
    try:
        loaded = load_built_index(st, sp.name)
    except SidecarError as e:
        notes.append(f"no usable index for space {sp.name!r}, exact search over {len(sp)} vectors instead: {e}")
        return None
    if loaded is None:
        notes.append(f"no index for space {sp.name!r}: exact search over {len(sp)} vectors "
                     f"(build one with `embedstore index {st.path} --space {sp.name}`)")
        return None
    if not index_is_current(st, sp, loaded):
        notes.append(f"the index of space {sp.name!r} is out of date ({loaded.info.get('rows')} vectors indexed, "
                     f"{len(sp)} in the store, changed ones included): "
                     + ("rows added or changed since are searched exactly; " if stale_ok
                        else f"exact search over {len(sp)} vectors instead; ")
                     + f"run `embedstore index {st.path} --space {sp.name}` to bring it up to date")
        return loaded if stale_ok else None
    return loaded


def knn(sp: Space, queries: np.ndarray, k: int, index: LoadedIndex | None,
        positions: np.ndarray | None = None, unindexed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, store rows) of normalised queries: by the index when there is one.

    A filter (``positions``) over at most FILTER_EXACT_MAX rows is answered exactly; a larger one
    asks the index for enough extra candidates, falling back to exact search for queries that
    still come back short. ``unindexed``: positions a stale index lacks (added, or written again
    since it was built); they are searched exactly and merged with the index's hits, from which
    their old vectors are dropped.
    """
    if positions is not None and (index is None or len(positions) <= FILTER_EXACT_MAX):
        return exact_knn(queries, sp.vectors, sp.rows, k, positions)
    if index is not None and unindexed is not None and len(unindexed):
        return _merged(sp, queries, k, index, positions, unindexed)
    if index is None:
        return exact_knn(queries, sp.vectors, sp.rows, k)
    if positions is None:
        with omp_threads(1 if len(queries) == 1 else faiss.omp_get_max_threads()):
            return search_index(index, sp, queries, k)
    allowed = sp.rows[positions]
    wanted = min(len(sp), int(np.ceil(k * len(sp) / max(1, len(positions)) * 2)))
    scores, rows = search_index(index, sp, queries, wanted)
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_r = np.full((len(queries), k), -1, np.int64)
    for i in range(len(queries)):
        ok = np.isin(rows[i], allowed)
        got_s, got_r = scores[i][ok][:k], rows[i][ok][:k]
        if len(got_r) < min(k, len(allowed)):
            got_s, got_r = (a[0] for a in exact_knn(queries[i : i + 1], sp.vectors, sp.rows, k, positions))
        out_s[i, : len(got_s)], out_r[i, : len(got_r)] = got_s, got_r
    return out_s, out_r


def _merged(sp: Space, queries: np.ndarray, k: int, index: LoadedIndex, positions: np.ndarray | None,
            unindexed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``knn`` over a stale index: its hits (less rows it holds an old vector of) + exact ones over
    the unindexed positions, best k of both."""
    fresh = unindexed if positions is None else np.intersect1d(unindexed, positions, assume_unique=True)
    scores, rows = knn(sp, queries, min(len(sp), k + min(len(unindexed), k)), index, positions)
    stale = np.isin(rows, sp.rows[unindexed])
    scores, rows = np.where(stale, -np.inf, scores).astype(np.float32), np.where(stale, -1, rows)
    if len(fresh):
        s2, r2 = exact_knn(queries, sp.vectors, sp.rows, k, fresh)
        scores, rows = np.hstack([scores, s2]), np.hstack([rows, r2])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _hits(sp: Space, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
    """The hits of one query: path and label read for these rows only."""
    pos = sp.positions_of(rows)
    ok = (rows >= 0) & (pos >= 0)  # an index may return rows the space no longer has
    pos = pos[ok]
    paths, labels, splits = sp.column("path", pos), sp.column("label", pos), sp.column("split", pos)
    return [{"path": str(p), "score": round(float(s), 6), "row": int(r), "label": str(lab), "split": str(sp_)}
            for s, r, p, lab, sp_ in zip(scores[ok], rows[ok], paths, labels, splits)]


def search(store: str | os.PathLike | Store, *, images: Sequence[str] | None = None,
           rows: Sequence[int] | None = None, paths: Sequence[str] | None = None,
           vectors: np.ndarray | None = None, k: int = 10, space: str | None = None,
           where: dict[str, str] | None = None, exact: bool = False, exclude_self: bool = False,
           device: str = "auto", index: LoadedIndex | None = None,
           texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Nearest neighbours by cosine similarity of query images, store rows, stored paths, vectors or texts.

    Args:
        store: the ``.h5`` store (path or open ``Store``).
        images: query image files or folders (embedded with the space's backbone).
        rows: store rows whose stored vectors are the queries.
        paths: stored image paths whose vectors are the queries.
        vectors: raw query vectors of the space's dimension.
        texts: text queries such as ``["a photo of a cat"]``, embedded by the text tower of a space
            embedded with an ``open_clip:`` backbone (``QueryError`` for any other space).
        k: neighbours per query; more than the rows that can be returned gives all of them
            (a note says so).
        space: embedding space (default: the store's first frozen space).
        where: filters such as ``{"label": "cat", "split": "val"}`` (all must hold; strings such
            as ``"label=cat"`` become one with :func:`parse_where`); one that no image passes
            raises ``QueryError`` naming the values there are.
        exact: ignore the index and search exactly.
        exclude_self: drop each query's own row from its hits (still up to k hits): the row
            queried, the stored row of a query image's path, else the rows of identical content.
        device: where query images and texts are embedded.
        index: the space's index as :func:`embedstore.index.load_index` read it, kept by a caller
            that searches many times (default: read it now). One that is out of date still answers
            for the rows it holds; rows added or changed since are searched exactly.

    Returns ``{"results": [[{"path", "score", "row", "label", "split"}, ...], ...], "queries": [...],
    "exact": bool, "index": {...} or None, "available": int, "notes": [...], "stages": {...}}``, one result list per
    query; a query image that cannot be read gets an empty list and an ``error`` in ``queries``.
    """
    if sum(x is not None for x in (images, rows, paths, vectors, texts)) != 1:
        raise QueryError("give exactly one kind of query: images, rows, paths, vectors or texts")
    if k < 1:
        raise QueryError(f"k must be at least 1, not {k}")
    stages: dict[str, float] = {}
    notes: list[str] = []
    filters = check_where(where)
    with timed(stages, "open_store"):
        st, sp = _open(store, space)
    positions = filter_positions(sp, filters)
    available = len(sp) if positions is None else len(positions)
    if not available:
        raise QueryError(f"space {sp.name!r} of {st.path} has no vectors yet: run `embedstore embed` first")
    asked, k = k, min(k, available)  # before anything of size k is allocated
    with timed(stages, "queries"):
        q, described = _queries(st, sp, images, rows, paths, vectors, texts, device)
    selves = self_rows(st, sp, described, images is not None) if exclude_self else [set() for _ in described]
    if exclude_self and (vectors is not None or texts is not None):
        notes.append(f"exclude_self has no effect on {'vector' if texts is None else 'text'} queries: "
                     "they are no row of the store")
    extra = max((len(x) for x in selves), default=0)  # rows to ask for beyond k, dropped afterwards
    want = min(available, k + extra)
    if asked > want - extra:
        notes.append(f"k={asked}: only {available} images can be returned"
                     f"{' after the filter' if filters else ''}{', the query itself left out' if extra else ''}")
    with timed(stages, "load_index"):
        index = None if exact else _check_index(st, sp, index) if index is not None else _index_or_none(
            st, sp, notes, stale_ok=True)
        unindexed = None if index is None else unindexed_positions(st, sp, index)
        if unindexed is not None and len(unindexed) > max(FILTER_EXACT_MAX, len(sp) // 4):
            notes.append(f"{len(unindexed)} of {len(sp)} vectors are not in the index: exact search instead")
            index, unindexed = None, None
    with timed(stages, "search"):
        ok = np.array([d.get("error") is None for d in described], bool)
        scores, found = (knn(sp, q[ok], want, index, positions, unindexed) if ok.any()
                         else (np.empty((0, want)), np.empty((0, want))))
    results: list[list[dict[str, Any]]] = [[] for _ in described]
    for i, s, r in zip(np.flatnonzero(ok), scores, found):
        results[i] = [h for h in _hits(sp, s, r) if h["row"] not in selves[i]][:k]
    exact_used = index is None or (positions is not None and len(positions) <= FILTER_EXACT_MAX)
    return {
        "results": results,
        "queries": described,
        "space": sp.name,
        "k": k,
        "exclude_self": bool(exclude_self),
        "where": filters,
        "exact": bool(exact_used),
        "index": None if index is None else {key: index.info.get(key) for key in ("kind", "factory", "params",
                                                                                   "recall_at_10")},
        "available": int(available - extra),  # hits a query can have at most (after the filter, itself left out)
        "notes": notes,
        "stages": {key: round(v, 4) for key, v in stages.items()},
    }


def _check_index(st: Store, sp: Space, index: LoadedIndex) -> LoadedIndex:
    """A caller's index, refused (QueryError) when it belongs to another store or space."""
    uuid = index.info.get("store_uuid")
    if index.info.get("space") != sp.name or (uuid and st.uuid and uuid != st.uuid):
        raise QueryError(f"the index given ({index.files.sidecar}) belongs to space {index.info.get('space')!r} of "
                         f"store {uuid}, not space {sp.name!r} of {st.path}: load this space's own index "
                         "with embedstore.index.load_index")
    return index


def _queries(st: Store, sp: Space, images: Sequence[str] | None, rows: Sequence[int] | None,
             paths: Sequence[str] | None, vectors: np.ndarray | None, texts: Sequence[str] | None,
             device: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    if texts is not None:
        from ..embedding.text import embed_texts  # torch and open_clip: text queries only

        q = embed_texts(sp, texts, device=device)  # QueryError for a space without a text tower
        return q, [{"query": f"text: {t}"} for t in texts]
    if images is not None:
        from ..data.collection import expand_images  # PIL: only image queries need it

        check_has_backbone(sp)
        files = [it.path for it in expand_images(images, what="query image")]
        q, errors = embed_images(sp, files, device=device)
        return q, [{"query": f, "error": e} if e else {"query": f} for f, e in zip(files, errors)]
    if vectors is not None:
        q = np.atleast_2d(np.asarray(vectors, np.float32))
        if q.shape[1] != sp.dim:
            raise QueryError(f"query vectors have dimension {q.shape[1]}, space {sp.name!r} has {sp.dim}: "
                             "give vectors from this space's backbone, or images to embed")
        return normalized(q), [{"query": f"vector {i}"} for i in range(len(q))]
    if paths is not None:
        rows = path_rows(st, paths)
    pos = row_positions(sp, rows)
    unique, back = np.unique(pos, return_inverse=True)  # read in file order, each once; give back as asked
    q = normalized(sp.vectors, unique)[back.reshape(-1)]
    return q, [{"query": str(p), "row": int(r)} for p, r in zip(sp.column("path", pos), rows)]
