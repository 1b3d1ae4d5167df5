"""Which faiss index to build: a kind name or factory string turned into a factory for n vectors of
dimension dim within a memory budget (autofaiss-style rules), and the empty index itself.

Crash safety: pure choices and in-memory indexes; nothing here writes a file.
"""
from __future__ import annotations

import re

import faiss
import numpy as np

from ..choices import INDEX_KINDS
from ..errors import IndexBuildError
from ..utils import format_size
from .checks import check_trainable, faiss_message

KINDS = INDEX_KINDS
FLAT_MAX_ROWS = 20_000  # exact search answers a query in about a millisecond below this
HNSW_MAX_ROWS = 100_000  # HNSW builds in about a minute on two cores below this
HNSW_M = 32
PQ_MIN_ROWS = 100_000  # from here on, auto always picks compressed IVF-PQ codes re-ranked from the store
# faiss memory-maps array inverted lists but reads fast-scan (4-bit, blocked) lists whole; above this
# size a search would load them all, so auto picks 8-bit codes in a mapped array instead
READ_WHOLE_MAX = 512 << 20
DEFAULT_MEMORY = 4 * 2**30


def check_memory(memory: int) -> int:
    """``memory`` when it is a positive whole number of bytes; else IndexBuildError saying how to give one."""
    if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or memory <= 0:
        raise IndexBuildError(f"memory is a positive number of bytes (e.g. 4 * 2**30), not {memory!r}: "
                              "parse a size such as '4G' with embedstore.utils.parse_size")
    return int(memory)


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: sqrt(n) rounded to a power of two, at least 39 vectors each.

    autofaiss takes 4*sqrt(n) and up; on a CPU the k-means and the assignment of every vector
    cost O(n * lists), and with fast-scan codes scanning the longer lists stays cheap.
    """
    lists = 2 ** round(np.log2(max(1.0, np.sqrt(n))))
    return int(max(1, min(lists, 16384, n // 39)))


def pq_codes(n: int, dim: int) -> list[str]:
    """OPQ+IVF+PQ factories for n vectors of dimension dim, from the largest code to the smallest.

    Sub-vectors keep at least 8 dimensions (k-means on fewer is slow in faiss and adds little);
    below 10k vectors, too few to train 256 centroids per sub-quantizer, codes are 4-bit and
    there is no OPQ rotation. Every one keeps its inverted lists as a plain array, which a
    search memory-maps (:mod:`.files`).
    """
    lists, big = ivf_lists(n), n >= 10_000
    return [f"OPQ{m},IVF{lists},PQ{m}np" if big else f"IVF{lists},PQ{m}x4np"
            for m in (64, 48, 32, 24, 16, 8, 4, 2, 1) if not dim % m and (dim // m >= 8 or m == 1)]


def too_small(budget: int, n: int, dim: int, smallest: str, need: int, what: str = "") -> IndexBuildError:
    """The error of a budget that cannot hold even the smallest index."""
    return IndexBuildError(
        f"--memory {format_size(budget)} is too small for {n} vectors of dimension {dim}{what}: the smallest "
        f"index ({smallest}) needs {format_size(need)}; allow at least {format_size(need)}"
        + (f" (--memory {format_size(need)})" if not what else ""))


def pq_factory(n: int, dim: int, budget: int) -> str:
    """The largest OPQ+IVF+PQ code (:func:`pq_codes`) whose index fits ``budget`` bytes (autofaiss's rule)."""
    codes = pq_codes(n, dim)
    for factory in codes:
        if estimate_bytes(factory, n, dim) <= budget:
            return factory
    raise too_small(budget, n, dim, codes[-1], estimate_bytes(codes[-1], n, dim))


def auto_candidates(n: int, dim: int) -> list[tuple[str, bool]]:
    """The factories ``auto`` considers for n vectors of dimension dim, best first, with whether
    their candidates are re-ranked from the stored vectors (see :func:`choose_factory`)."""
    out: list[tuple[str, bool]] = []
    if n < PQ_MIN_ROWS and n < FLAT_MAX_ROWS:
        out.append(("Flat", False))
    elif n < PQ_MIN_ROWS and n < HNSW_MAX_ROWS:
        out.append((f"HNSW{HNSW_M}", False))
    fast_scan = f"IVF{ivf_lists(n)},PQ{dim // 4}x4fs"
    if not dim % 4 and estimate_bytes(fast_scan, n, dim) <= READ_WHOLE_MAX:
        out.append((fast_scan, True))
    return out + [(f, True) for f in pq_codes(n, dim)]


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
    rotation = dim * dim * 4 if "OPQ" in f else 0
    return code + refine + extra + rotation


def choose_factory(n: int, dim: int, memory: int = DEFAULT_MEMORY) -> str:
    """The index an autofaiss-style rule picks for n vectors of dimension dim whose index may take
    ``memory`` bytes (a build gives it what its whole-process budget leaves, :mod:`.budget`).

    * n < 20k: ``Flat`` (exact; a query costs about a millisecond)
    * n < 100k and the graph fits: ``HNSW32`` (best latency; builds in about a minute on two cores)
    * from ``PQ_MIN_ROWS`` (100k) rows on, or when those do not fit: ``IVF{lists},PQ{dim/4}x4fs``
      (4-bit fast-scan codes, dim/8 bytes a vector, scanned with SIMD lookups) while that index
      is at most ``READ_WHOLE_MAX`` (512 MiB: about 7M vectors of 512 dimensions), because faiss
      cannot memory-map fast-scan lists and a search reads them whole; else, or where those do not
      fit, ``OPQ{m},IVF{lists},PQ{m}np`` with the largest 8-bit code that fits (the OPQ rotation
      is what keeps few bytes a vector accurate; its inverted lists are one array a search
      memory-maps, so a query pages in only the lists it probes); the best ``k_factor * k``
      candidates of either are re-ranked exactly from the stored float16 vectors (:mod:`.rerank`,
      ``k_factor`` tuned with nprobe). From 100k rows on the full-vector copies
      of Flat, HNSW, IVF-Flat or IVF-PQ+RFlat (4 bytes a dimension, 2 GiB at 1M x 512) would
      cost more memory than the rows themselves on disk, while codes + ids take 72 bytes a
      vector; the inverted lists are saved as one array that search memory-maps, and the
      re-ranking reads k_factor * k rows from the store. (IVF-PQ+RFlat, the auto choice up to
      ~2M rows before, stays available as ``--kind ivf-pq-refine``.)
    """
    budget = check_memory(memory)
    candidates = auto_candidates(n, dim)
    for factory, _ in candidates:
        if estimate_bytes(factory, n, dim) <= budget:
            return factory
    smallest = candidates[-1][0]
    raise too_small(budget, n, dim, smallest, estimate_bytes(smallest, n, dim))


def reranked(kind: str, factory: str) -> bool:
    """Whether a build of ``kind`` (resolved to ``factory``) re-ranks its candidates from the stored vectors."""
    return kind == "auto" and "PQ" in factory.upper() and "RFLAT" not in factory.upper()


def resolve_kind(kind: str, n: int, dim: int, memory: int = DEFAULT_MEMORY) -> str:
    """The faiss factory string for a ``--kind`` (a kind name or a factory string)."""
    factory = _named_factory(kind, n, dim, check_memory(memory))
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(
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
            raise IndexBuildError(f"--kind ivf-pq-refine needs a dimension divisible by 4, not {dim}: "
                                  "use --kind ivf-pq or ivf-flat")
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
    if re.fullmatch(r"(OPQ\d+(_\d+)?,)?IVF\d+,PQ\d+(X\d+(FS)?)?(NP)?", f):
        return "ivf-pq"
    return factory



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

