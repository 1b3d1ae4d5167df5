"""Checks that keep bad input away from faiss: index sidecars read back from disk, search
parameters, and factory strings against the rows they would be trained on.

Crash safety: pure checks; nothing here writes a file. A sidecar is data anyone may have edited,
so nothing in it (a generation, a parameter, a number, a path) is used before it has passed
``check_sidecar``; messages describe what is wrong without echoing the sidecar's values.
"""
from __future__ import annotations

import math
import re
from typing import Any

import faiss

from ..errors import IndexBuildError, SidecarError

MAX_GENERATION = 2**31 - 1  # builds number their files 1, 2, 3...; anything larger was not written by one
PARAM_LIMITS = {"nprobe": None, "efSearch": 4096, "k_factor_rf": 128,  # None: at most the index's lists
                "k_factor": 128}  # re-ranking from the stored vectors (.rerank): any index
_INTS = ("rows", "bytes", "rows_bytes", "dim", "recall_queries", "added", "removed", "space_generation")
_NUMBERS = ("recall_at_10", "latency_p50_ms", "latency_p99_ms", "target_recall", "build_seconds")
_STRINGS = ("factory", "kind", "space", "backbone", "weights_sha256", "memory", "device", "mode", "store_uuid",
            "rerank")


def faiss_message(e: BaseException) -> str:
    """The readable part of a faiss exception: no C++ signature, source file or line."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    m = re.match(r"^Error in .*? at \S+:\d+: (.*)$", text)
    text = m.group(1) if m else text
    return re.sub(r"^Error: '.*?' failed: ", "", text)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def valid_generation(x: Any) -> bool:
    return _is_int(x) and 0 <= x <= MAX_GENERATION


def check_sidecar(info: Any) -> dict[str, Any]:
    """``info`` when it has the shape a build writes; else SidecarError saying what is wrong (a phrase
    such as "its 'rows' is not ...", which the loader completes with the file's name and the fix)."""
    if not isinstance(info, dict):
        raise SidecarError(f"it holds a JSON {type(info).__name__ if info is not None else 'null'}, not an object")
    if not valid_generation(info.get("generation", 0)):
        raise SidecarError(f"its generation is not a whole number from 0 to {MAX_GENERATION}")
    for key in _INTS:
        if key in info and not (_is_int(info[key]) and info[key] >= 0):
            raise SidecarError(f"its {key!r} is not a non-negative whole number")
    for key in _NUMBERS:
        if key in info and not _is_number(info[key]):
            raise SidecarError(f"its {key!r} is not a number")
    for key in _STRINGS:
        if key in info and not (isinstance(info[key], str) or (info[key] is None and key != "factory")):
            raise SidecarError(f"its {key!r} is not a string")
    if not isinstance(info.get("factory"), str):
        raise SidecarError("it names no index factory")
    params = info.get("params", {})
    if not isinstance(params, dict):
        raise SidecarError("its 'params' is not an object of search parameters")
    for name, value in params.items():
        if name not in PARAM_LIMITS:
            raise SidecarError(f"its 'params' holds {name!r}, not one of {', '.join(PARAM_LIMITS)}")
        if not (_is_int(value) and value >= 1):
            raise SidecarError(f"its search parameter {name!r} is not a positive whole number")
    curve = info.get("tuning_curve", [])
    if not (isinstance(curve, list) and all(isinstance(c, list) and len(c) == 2 and all(map(_is_number, c))
                                            for c in curve)):
        raise SidecarError("its 'tuning_curve' is not a list of [value, recall] pairs")
    return info


def check_params(index: faiss.Index, params: dict[str, int]) -> None:
    """SidecarError (a phrase, as above) unless every parameter applies to ``index`` and lies in the
    range a tuning uses."""
    ivf = faiss.try_extract_index_ivf(index)
    knobs = {"nprobe": int(ivf.nlist)} if ivf is not None else {}
    knobs["k_factor"] = PARAM_LIMITS["k_factor"]
    if has_hnsw(index):
        knobs["efSearch"] = PARAM_LIMITS["efSearch"]
    if is_refined(index):
        knobs["k_factor_rf"] = PARAM_LIMITS["k_factor_rf"]
    for name, value in params.items():
        if name not in knobs:
            raise SidecarError(f"search parameter {name!r} does not apply to this index type")
        if value > knobs[name]:
            raise SidecarError(f"search parameter {name!r} is above {knobs[name]}, the most this index uses")


def _inner(idx: faiss.Index) -> faiss.Index | None:
    inner = getattr(idx, "index", None) or getattr(idx, "base_index", None)
    return faiss.downcast_index(inner) if inner is not None else None


def _walk(index: faiss.Index) -> list[faiss.Index]:
    out, idx = [], faiss.downcast_index(index)
    while idx is not None and len(out) < 8:
        out.append(idx)
        idx = _inner(idx)
    return out


def has_hnsw(index: faiss.Index) -> bool:
    """Whether an HNSW graph is anywhere in ``index`` (an efSearch to tune)."""
    return any(isinstance(i, faiss.IndexHNSW) for i in _walk(index))


def is_refined(index: faiss.Index) -> bool:
    """Whether ``index`` re-ranks its candidates (``IndexRefine``: a k_factor_rf to tune)."""
    return any(isinstance(i, faiss.IndexRefine) for i in _walk(index))


def min_training_rows(index: faiss.Index) -> tuple[int, str]:
    """The fewest vectors ``index`` can be trained on, and what needs them (0, "" when untrained)."""
    need, why = 0, ""
    for idx in _walk(index):
        for i in range(idx.chain.size()) if isinstance(idx, faiss.IndexPreTransform) else ():
            vt = faiss.downcast_VectorTransform(idx.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):  # trains 256-centroid sub-quantizers unless given a PQ
                ksub = int(vt.pq.ksub) if vt.pq is not None else 256
                if ksub > need:
                    need, why = ksub, f"the OPQ rotation trains {ksub} centroids per sub-vector"
        if isinstance(idx, faiss.IndexIVF) and int(idx.nlist) > need:
            need, why = int(idx.nlist), f"{idx.nlist} inverted lists need a training vector each"
        pq = getattr(idx, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer) and int(pq.ksub) > need:
            need, why = int(pq.ksub), f"{pq.nbits}-bit PQ codes train {pq.ksub} centroids per sub-vector"
    return need, why


def check_trainable(index: faiss.Index, factory: str, kind: str, n: int) -> None:
    """IndexBuildError naming the kind, the rows and a fix when ``index`` cannot be trained on n vectors."""
    need, why = min_training_rows(index)
    if n >= need:
        return
    named = f"--kind {kind}" + (f" ({factory})" if factory != kind else "")
    lists = max(1, n // 39)
    raise IndexBuildError(
        f"{named} cannot be trained on the {n} vectors of this space: {why}, so it needs at least {need}. "
        f"Use fewer lists (e.g. --kind 'IVF{lists},Flat'), --kind flat (exact, best below 20000 vectors) "
        f"or --kind auto, or embed more images first"
    )
