"""Re-ranking an index's candidates exactly from the stored vectors, and searching a loaded index.

A compressed index (IVF-PQ codes) finds candidates; the best ``k_factor * k`` of them are scored
again by the exact cosine of the stored (float16) vectors. This replaces faiss's
``IndexRefineFlat``, which keeps a float32 copy of every vector in memory. ``rerank`` reads the
stored vectors one of two ways, chosen for each pass of queries by the share of the vectors' HDF5
chunks their candidates touch (``touches_densely``):

* sparse (a search of a few queries): the candidates' rows only, ``vectors[sorted positions]``,
  CANDIDATES_PER_BATCH candidates at a time (a few point reads);
* dense (``duplicates``: thousands of queries whose candidates touch most chunks, where point
  reads would read the whole array again for every block of queries): ONE sequential pass over
  the vectors, slab by slab (``vectors[a:b]``, whole chunks, normalised per slab), each candidate
  scored when its slab goes by. A pass serves as many queries as RERANK_BYTES holds
  (``queries_per_pass``); more queries take more passes.

Both score with the same float32 dot products of L2-normalised vectors (faiss's indexed inner
products) and keep the top k by a stable sort of the candidates' scores, so they agree.

Crash safety: reads only; nothing here writes a file.
"""
from __future__ import annotations

from typing import Any, Callable

import faiss
import numpy as np

from ..store.format import vector_chunk
from .vectors import iter_chunks, normalized

CANDIDATES_PER_BATCH = 65_536  # sparse: candidate vectors held at once (65536 x 512 float32 = 128 MiB)
RERANK_BYTES = 256 << 20  # dense: memory of one pass (its queries, candidates, sort keys and scores)
CANDIDATE_BYTES = 32  # a candidate in a pass: id, position (then sort key), score, lookup order (freed first)
DENSE_SHARE = 1 / 8  # a pass once the candidates touch this share of the vectors' chunks (see touches_densely)
SEARCH_QUERIES = 8192  # queries per faiss search for candidates (IVF fast-scan holds ~10 KB of tables a query)
SLAB_BYTES = 8 << 20  # stored bytes a pass reads at a time (whole chunks; 8192 rows of 512 float16)


def chunk_rows(vectors: Any) -> int:
    """Rows per HDF5 chunk of ``vectors``: its own chunk shape when it exposes one (h5py), else
    the rows the store's writer gives a vectors chunk of this dimension and dtype."""
    chunks = getattr(vectors, "chunks", None)
    if chunks:
        return int(chunks[0])
    return vector_chunk(int(vectors.shape[1]), np.dtype(vectors.dtype))


def queries_per_pass(dim: int, width: int) -> int:
    """Queries of ``width`` candidates whose re-rank fits one pass of RERANK_BYTES."""
    return max(1, RERANK_BYTES // (4 * dim + CANDIDATE_BYTES * max(1, width)))


def touches_densely(positions: np.ndarray, n: int, chunk: int) -> bool:
    """Whether candidates at ``positions`` (-1: none) of ``n`` rows are read best in one pass.

    HDF5 reads whole chunks of ``chunk`` rows, so point reads cost at least one chunk per touched
    chunk (the store's reader even merges nearby rows into slabs), in many scattered reads, and
    again for every block of queries; the pass reads every chunk once, in order, for all of the
    pass's queries. Once at least DENSE_SHARE of the chunks are touched the pass reads at most
    1 / DENSE_SHARE times the bytes of the point reads, sequentially.
    """
    total = -(-n // max(1, chunk))
    touched = np.zeros(total, bool)
    flat = positions.reshape(-1)
    for s in iter_chunks(len(flat), CANDIDATES_PER_BATCH):
        p = flat[s]
        touched[p[p >= 0] // chunk] = True
    return bool(total) and int(np.count_nonzero(touched)) >= DENSE_SHARE * total


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
           candidates: np.ndarray, k: int, *, dense: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The top-k (scores, ids) of each query among its candidate ids, by exact cosine, best first.

    ``vectors`` is the (n, dim) array-like the ids point into through ``positions_of`` (a store's
    ``Space.vectors`` and ``Space.positions_of``); ``queries`` are L2-normalised. Candidates that
    are -1 or gone from ``vectors`` are dropped; rows of fewer than k hits are padded with -1
    (score -inf); equal scores keep the candidates' order. Queries go through in passes of
    ``queries_per_pass``; each pass reads the candidates' rows, or (``touches_densely``) every
    row once in order. ``dense``: True / False force one way (tests); None chooses.
    """
    queries = np.ascontiguousarray(queries, np.float32)
    candidates = np.asarray(candidates, np.int64)
    nq, width = candidates.shape
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    if not nq or not width:
        return out_s, out_i
    n, chunk = len(vectors), chunk_rows(vectors)
    for s in iter_chunks(nq, queries_per_pass(queries.shape[1], width)):
        cand = candidates[s]
        pos = _positions(positions_of, cand)
        if touches_densely(pos, n, chunk) if dense is None else dense:
            scores = _one_pass(vectors, queries[s], pos, chunk)  # pos becomes its sort keys
        else:
            scores = _point_reads(vectors, queries[s], pos)
        del pos
        _top(scores, cand, out_s[s], out_i[s])
    return out_s, out_i


def _positions(positions_of: Callable[[np.ndarray], np.ndarray], cand: np.ndarray) -> np.ndarray:
    """The position of each candidate id (-1: none or absent), looked up in id order (binary
    searches that follow each other stay in cache: several times faster for millions of ids)."""
    flat = cand.reshape(-1)
    order = np.argsort(flat)
    pos = np.empty(len(flat), np.int64)
    for s in iter_chunks(len(flat), CANDIDATES_PER_BATCH):  # positions_of's temporaries stay small
        at = order[s]
        pos[at] = positions_of(flat[at])
    pos[flat < 0] = -1
    return pos.reshape(cand.shape)


def _point_reads(vectors: Any, queries: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Scores (-inf where no row) of each query's candidate positions, reading only those rows."""
    nq, width = pos.shape
    scores = np.full((nq, width), -np.inf, np.float32)
    for s in iter_chunks(nq, max(1, CANDIDATES_PER_BATCH // width)):
        p = pos[s]
        ok = p >= 0
        if not ok.any():
            continue
        uniq, inv = np.unique(p[ok], return_inverse=True)
        local = np.full(p.shape, -1, np.int64)
        local[ok] = inv.reshape(-1)
        block = normalized(vectors, uniq)  # sorted positions: one ordered read
        out, q = scores[s], queries[s]  # named: faiss gets their pointers (contiguous row ranges)
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(block),
                                         faiss.swig_ptr(local), block.shape[1], len(p), width)
    return scores


def _one_pass(vectors: Any, queries: np.ndarray, pos: np.ndarray, chunk: int) -> np.ndarray:
    """Scores (-inf where no row) of each query's candidate positions, reading the vectors once in
    order: the candidates sorted by position (key = position * size + entry, made in place of
    ``pos``), then for each slab of whole chunks that holds some, the dot products of those with
    their queries."""
    nq, width = pos.shape
    size = nq * width
    dim = queries.shape[1]
    key = pos.reshape(-1)  # -1 (none) gives a negative key: sorted first, never read
    key *= size
    for s in iter_chunks(size, CANDIDATES_PER_BATCH):
        key[s] += np.arange(s.start, s.stop, dtype=np.int64)
    key.sort()
    scores = np.full(size, -np.inf, np.float32)
    step = chunk * max(1, SLAB_BYTES // max(1, chunk * dim * np.dtype(vectors.dtype).itemsize))
    at, n = int(np.searchsorted(key, 0)), len(vectors)
    while at < size:
        a = int(key[at] // size) // step * step
        b = min(n, a + step)
        end = at + int(np.searchsorted(key[at:], b * size))
        block = normalized(vectors, slice(a, b))
        rows, entries = np.divmod(key[at:end], size)
        rows -= a
        which = entries // width  # the query of each candidate
        dots = np.empty(end - at, np.float32)
        faiss.pairwise_indexed_inner_product(dim, end - at, faiss.swig_ptr(queries), faiss.swig_ptr(which),
                                             faiss.swig_ptr(block), faiss.swig_ptr(rows), faiss.swig_ptr(dots))
        scores[entries] = dots
        at = end
    return scores.reshape(nq, width)


def _top(scores: np.ndarray, cand: np.ndarray, out_s: np.ndarray, out_i: np.ndarray) -> None:
    """The best ``out_s.shape[1]`` of each row of ``scores`` (stable: ties keep the candidates'
    order), with their ids (-1 where the score is -inf), into ``out_s`` / ``out_i``."""
    nq, width = scores.shape
    top = min(out_s.shape[1], width)
    for s in iter_chunks(nq, max(1, CANDIDATES_PER_BATCH // width)):
        order = np.argsort(-scores[s], axis=1, kind="stable")[:, :top]
        best = np.take_along_axis(scores[s], order, axis=1)
        out_s[s, :top] = best
        out_i[s, :top] = np.where(np.isfinite(best), np.take_along_axis(cand[s], order, axis=1), -1)


def search_index(loaded: Any, sp: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, store rows) of L2-normalised ``queries`` by a :class:`.files.LoadedIndex` of space ``sp``.

    When the index was built to be re-ranked (its sidecar's ``params.k_factor``), the best
    ``k_factor * k`` candidates are re-ranked exactly from ``sp.vectors`` (``rerank``); otherwise
    the index's own scores are returned. The caller sets faiss's threads.
    """
    q = np.ascontiguousarray(queries, np.float32)
    width = rerank_width(loaded, k)
    if not width:
        return loaded.index.search(q, k)
    candidates = np.empty((len(q), width), np.int64)
    for s in iter_chunks(len(q), SEARCH_QUERIES):
        candidates[s] = loaded.index.search(q[s], width)[1]  # the codes' distances are dropped at once
    return rerank(sp.vectors, sp.positions_of, q, candidates, k)


def rerank_width(loaded: Any, k: int) -> int:
    """Candidates per query ``search_index`` re-ranks for k hits; 0 when the index's scores are final."""
    k_factor = loaded.k_factor
    return max(k, min(int(loaded.index.ntotal), k * k_factor)) if k_factor else 0
