"""The report's Audit section: :func:`embedstore.curation.audit` of one space, reshaped into plain
values with thumbnails for the template (templates/report.html.j2 escapes them).

Label issues show the image with its given and suggested label and the given label's out-of-fold
probability; outliers show the image with its k-NN distance; leaks show the two images of each
cross-split pair side by side with their splits and cosine.

Crash-safety: the store is only read; the audit keeps the k-NN graph cache that the report's
near-duplicates already use (each file atomically, :mod:`embedstore.search.graph`).
"""
from __future__ import annotations

from typing import Any

from ..errors import EmbedstoreError
from ..store import Space, Store
from .thumbs import Thumbnails

MAX_AUDIT_SHOWN = 24  # images per audit part (leak pairs: pairs)


def audit_data(st: Store, sp: Space, thumbs: Thumbnails, seed: int, threshold: float, notes: list[str],
               top: int = MAX_AUDIT_SHOWN) -> dict[str, Any]:
    """The audit of ``sp`` (the default head, logreg, 5 folds; leaks at the report's near-duplicate
    ``threshold``) as the template's ``audit`` macro takes it."""
    from ..curation import audit

    try:
        report = audit(st, space=sp.name, top=top, seed=seed, leak_threshold=threshold)
    except EmbedstoreError as e:
        notes.append(f"audit of space {sp.name} skipped: {e}")
        return {"skipped": str(e)}
    s = report.summary
    thumbs.add([r["row"] for r in report.label_issues + report.outliers]
               + [p[side]["row"] for p in report.leaks for side in ("a", "b")])
    issues = [{"img": thumbs.img(r["row"], f" (given {r['label']}, suggested {r['suggested']})"), "label": r["label"],
               "suggested": r["suggested"], "score": r["score"]} for r in report.label_issues]
    outliers = [{"img": thumbs.img(r["row"], f" (distance {r['score']:.3f})"), "label": r["label"] or "-",
                 "score": r["score"]} for r in report.outliers]
    leaks = [{"score": p["score"], "pair": [{"img": thumbs.img(p[side]["row"]), "split": p[side]["split"],
                                             "label": p[side]["label"] or "-"} for side in ("a", "b")]}
             for p in report.leaks]
    return {"skipped": None, "space": sp.name, "head": s["head"], "folds": s["folds"], "checked": s["checked"],
            "n_issues": s["label_issues"], "n_scored": s["outliers_scored"], "k": s["k"], "n_leaks": s["leak_pairs"],
            "threshold": s["leak_threshold"], "splits": ", ".join(s["splits"]) or "none", "issues": issues,
            "outliers": outliers, "leaks": leaks, "notes": s["notes"], "top": top, "counts": {
                "label_issues": s["label_issues"], "outliers_scored": s["outliers_scored"], "leaks": s["leak_pairs"]}}
