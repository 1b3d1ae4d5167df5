"""``audit``: curation over one space of a store: label issues, outliers and leaks between splits.

Crash safety: the store is only read; the one file written is the k-NN graph cache that
``duplicates`` keeps too (each batch atomically, :mod:`embedstore.search.graph`; ``cache=False``
writes nothing). A kill at any moment leaves the store as it was.

Cost: the label check reads the labelled rows' vectors (in chunks, :func:`embedstore.heads.rows.read_vectors`)
and fits ``folds`` heads; outliers and leaks share one pass over the space's k-NN graph, one batch in
memory at a time (reused from the cache when ``duplicates`` or an earlier audit built it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..choices import DUPLICATES_THRESHOLD
from ..errors import HeadError, IndexFileError, QueryError
from ..heads.rows import labelled_rows, read_vectors
from ..search import knn_graph
from ..store import Store, open_store
from ..utils import timed
from .labels import RANK_BY, LabelCheck, check_head, find_issues, issue_rows
from .leaks import LeakPairs
from .outliers import OutlierScores
from .records import image_records

DEFAULT_TOP = 50  # rows listed per section by default
DEFAULT_K = 10  # neighbours per image: the k of `duplicates`, so both use one cached graph


@dataclass(frozen=True)
class AuditReport:
    """What :func:`audit` found in one space; ``to_dict()`` is what ``embedstore audit --json`` prints.

    label_issues: ``{"path", "row", "split", "label", "suggested", "score", "suggested_score"}`` per
        flagged image, most suspicious first; ``score`` is the given label's out-of-fold probability.
    outliers: ``{"path", "row", "label", "split", "score"}``, the most isolated first; ``score`` is the
        mean cosine distance to the k nearest other images.
    leaks: ``{"score", "a": {"path", "row", "label", "split"}, "b": {...}}`` per cross-split pair at
        cosine >= the leak threshold, the closest first (``a`` in the earlier split: train, val, test).
    summary: counts, the settings used and ``notes`` per section (why a section is empty).
    stages: seconds per stage.
    """

    label_issues: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    leaks: list[dict[str, Any]]
    summary: dict[str, Any]
    stages: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label_issues": self.label_issues, "outliers": self.outliers, "leaks": self.leaks,
                "summary": self.summary, "stages": self.stages}


def _check_args(head: str, folds: int, top: int | None, leak_threshold: float, k: int, seed: int) -> None:
    check_head(head)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise HeadError(f"folds must be an integer of at least 2, not {folds!r}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise QueryError(f"top must be a positive integer (rows listed per section) or None for all, not {top!r}")
    if not -1 <= leak_threshold <= 1:
        raise QueryError(f"leak_threshold is a cosine similarity in [-1, 1], not {leak_threshold}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise QueryError(f"k must be a positive integer (neighbours per image), not {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise QueryError(f"seed must be an integer in [0, 2**32 - 1], not {seed!r}")


def audit(store: str | os.PathLike | Store, *, space: str | None = None, head: str = "logreg", folds: int = 5,
          top: int | None = DEFAULT_TOP, leak_threshold: float = DUPLICATES_THRESHOLD, k: int = DEFAULT_K,
          seed: int = 0, cache: bool = True) -> AuditReport:
    """Curation over one space: label issues, outliers and leaks between splits.

    Args:
        store: the ``.h5`` store (path or open ``Store``).
        space: the space (default: the store's default space, as everywhere).
        head: the head whose out-of-fold probabilities score the labels, one of
            :data:`embedstore.choices.HEADS` (fitted by the comparison protocol, ``classify``'s).
        folds: folds of the stratified cross-validation (lowered to the largest label's images).
        top: rows listed per section (None: all; the counts in ``summary`` are always complete).
        leak_threshold: cosine similarity at or above which two images of different splits are a
            leak (default: the near-duplicate cut of ``duplicates``).
        k: neighbours per image in the k-NN graph (outlier scores, leak candidates).
        seed: seed of the folds and of the heads' validation carve.
        cache: keep the k-NN graph beside the index for reuse (as ``duplicates`` does).

    A section that cannot be computed (no labels, one label, no splits, one image) is empty and
    ``summary["notes"]`` says why.
    """
    _check_args(head, folds, top, leak_threshold, k, seed)
    stages: dict[str, float] = {}
    notes: dict[str, list[str]] = {"label_issues": [], "outliers": [], "leaks": []}
    with timed(stages, "open_store"):
        st = store if isinstance(store, Store) else open_store(store)
        sp = st.space(space)
    with timed(stages, "label_issues"):
        issues, label_info = _label_issues(sp, head, folds, seed, top, notes["label_issues"])
    outliers, leaks, graph_info = _graph_sections(st, sp, k, leak_threshold, top, cache, stages, notes)
    summary = {"store": str(st.path), "space": sp.name, "images": len(sp), "head": head, **label_info,
               "k": k, "leak_threshold": leak_threshold, **graph_info, "top": top, "notes": notes}
    return AuditReport(issues, outliers, leaks, summary, {key: round(v, 4) for key, v in stages.items()})


def _label_issues(sp: Any, head: str, folds: int, seed: int, top: int | None,
                  notes: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lab = labelled_rows(sp)  # label and split codes only: no path or vector read
    info: dict[str, Any] = {"labelled": len(lab), "classes": len(set(lab.labels.tolist())), "folds": 0,
                            "rank_by": RANK_BY, "checked": 0, "label_issues": 0}
    if not len(lab):
        notes.append(f"space {sp.name!r} has no labelled image: embed a folder laid out as <class>/img (or a CSV "
                     "list path,label) to check labels")
        return [], info
    X = read_vectors(sp, lab.positions)  # the labelled rows only, float32, chunk by chunk
    check: LabelCheck = find_issues(X, lab.labels, head=head, folds=folds, seed=seed)
    del X
    notes += check.notes
    found = issue_rows(check, lab.labels)
    info.update(folds=check.folds, checked=len(check.checked) if check.folds else 0, label_issues=len(found))
    found = found if top is None else found[:top]
    pos = lab.positions[[f["index"] for f in found]] if found else np.empty(0, np.int64)
    out = [{**image, "label": f["label"], "suggested": f["suggested"], "score": f["score"],
            "suggested_score": f["suggested_score"]} for f, image in zip(found, image_records(sp, pos))]
    return out, info


def _graph_sections(st: Store, sp: Any, k: int, threshold: float, top: int | None, cache: bool,
                    stages: dict[str, float], notes: dict[str, list[str]]) -> tuple[list, list, dict[str, Any]]:
    """Outliers and leaks from one pass over the space's k-NN graph (the one ``duplicates`` caches)."""
    info: dict[str, Any] = {"outliers_scored": 0, "leak_pairs": 0, "splits": [], "exact": None, "knn_cache": None}
    if len(sp) < 2:
        why = f"space {sp.name!r} holds {len(sp)} image(s): nothing to compare"
        notes["outliers"].append(why)
        notes["leaks"].append(why)
        return [], [], info
    scores = OutlierScores(sp, k)
    leaks = LeakPairs(sp, threshold)
    info["splits"] = leaks.splits
    if len(leaks.splits) < 2:
        notes["leaks"].append(f"space {sp.name!r} has {'one split' if leaks.splits else 'no splits'}: nothing can "
                              "leak; embed a folder laid out as train/<class>/img and val/<class>/img (or a CSV list "
                              "with a split column) to check")
        leaks = None
    graph_notes: list[str] = []
    try:
        knn_info, batches = knn_graph(st, sp, k, cache=cache, stages=stages, notes=graph_notes)
        for s, found, sims in batches:
            with timed(stages, "outliers_and_leaks"):
                scores.add(s, found, sims)
                if leaks is not None:
                    leaks.add(s, found, sims)
    except IndexFileError as e:
        for key in ("outliers", "leaks"):
            notes[key].append(f"skipped: {e}")
        return [], [], info
    graph_notes = [n for n in graph_notes if not n.startswith("no index")]  # exact search: the usual, small case
    notes["outliers"] += graph_notes
    if k >= len(sp):
        notes["outliers"].append(f"k={k}: the space holds {len(sp)} images, so each is compared with all others")
    with timed(stages, "rank"):
        ranked = scores.ranked(top)
        pairs, total = leaks.pairs(top) if leaks is not None else ([], 0)
    info.update(outliers_scored=scores.scored, leak_pairs=total, exact=bool(knn_info.get("exact", True)),
                knn_cache=knn_info)
    return ranked, pairs, info
