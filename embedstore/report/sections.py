"""The report's sections that only reshape what the store holds into plain values for the template
(templates/report.html.j2 escapes them): collection summary, failures, a space's map and
legend, frozen vs fine-tuned. The sections that search or classify are in :mod:`.page`.

Crash-safety: pure functions; nothing here writes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..store import Space, Store

MAX_FAILURES_SHOWN = 200
MAX_LEGEND = 40
MAP_W, MAP_H, MAP_PAD = 720, 480, 12
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
           "#9edae5", "#393b79")


def label_colors(labels: np.ndarray) -> dict[str, str]:
    names = sorted({str(x) for x in labels if x})
    out = {"": "#9a9a9a"}
    for i, name in enumerate(names):
        out[name] = PALETTE[i] if i < len(PALETTE) else f"hsl({(i * 137) % 360},60%,45%)"
    return out


def summary_data(st: Store) -> dict[str, Any]:
    s = st.summary()
    spaces = [[x["name"], x["backbone"], x["dim"], x["rows"], x["dtype"],
               st.spaces[x["name"]].attrs.get("parent_space", "-"), x["created"]] for x in s["spaces"]]
    return {"images": s["images"], "root": s["root"], "failures": s["failures"], "labels": s["labels"],
            "splits": s["splits"], "journal_parts": s["journal_parts"], "spaces": spaces}


def failures_data(st: Store) -> dict[str, Any]:
    rows = [[f["path"], f["space"], f["error"], f["message"]] for f in st.failures[:MAX_FAILURES_SHOWN]]
    return {"count": len(st.failures), "shown": MAX_FAILURES_SHOWN, "truncated": len(st.failures) > MAX_FAILURES_SHOWN,
            "rows": rows}


def space_data(i: int, sp: Space, xy: np.ndarray, rows: np.ndarray, labels: np.ndarray, colors: dict[str, str],
               how: str, gallery: dict[str, Any], dups: dict[str, Any]) -> dict[str, Any]:
    """A space's section: the map (one ``circle.pt`` per sampled row; ``data-row`` finds its thumbnail)."""
    lo, hi = (xy.min(0), xy.max(0)) if len(xy) else (np.zeros(2), np.ones(2))
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    px = MAP_PAD + (xy - lo) / span * [MAP_W - 2 * MAP_PAD, MAP_H - 2 * MAP_PAD]
    points = [(f"{x:.1f}", f"{MAP_H - y:.1f}", colors[str(lab)], int(row)) for (x, y), row, lab in zip(px, rows, labels)]
    names, counts = np.unique(np.asarray([str(x) for x in labels], dtype=object), return_counts=True)
    top = np.argsort(-counts, kind="stable")[:MAX_LEGEND]
    legend = [(colors[names[j]], names[j] or "(no label)", int(counts[j])) for j in sorted(top)]
    sampled = (f"a seeded random sample of {len(rows)} of its {len(sp)} images" if len(rows) < len(sp)
               else f"all {len(sp)} images")
    return {"i": i, "name": sp.name, "backbone": str(sp.attrs.get("backbone")), "dim": sp.dim, "how": how,
            "sampled": sampled, "points": points, "r": 4 if len(xy) <= 500 else 3, "w": MAP_W, "h": MAP_H,
            "legend": legend, "more_labels": max(0, len(names) - MAX_LEGEND), "gallery": gallery, "dups": dups}


def finetune_data(pairs: list[tuple[Space, Space]], report: Any, agreement: dict[str, float | None]) -> dict[str, Any]:
    """Per (frozen, fine-tuned) pair: head accuracies and neighbour label agreement side by side, and the
    training run recorded in the fine-tuned space's attrs."""
    acc = {} if report is None else {(r["space"], r["model"]): r["accuracy"] for r in report.results}
    models = [] if report is None else list(dict.fromkeys(r["model"] for r in report.results))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    listed = lambda v: ", ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    out = []
    for frozen, tuned in pairs:
        measures = [(f"{m} accuracy", acc.get((frozen.name, m)), acc.get((tuned.name, m))) for m in models]
        measures.append(("neighbours sharing the query's label", agreement.get(frozen.name), agreement.get(tuned.name)))
        rows = [[what, fmt(a), fmt(b), "-" if a is None or b is None else f"{b - a:+.4f}"] for what, a, b in measures]
        ft = tuned.attrs.get("finetune") or {}
        training = "; ".join(f"{key}: {listed(ft[key])}" for key in (
            "method", "trained_stages", "epochs_run", "best_epoch", "best_val_accuracy", "frozen_probe_val_accuracy",
            "train_images") if key in ft)
        out.append({"frozen": frozen.name, "tuned": tuned.name, "training": training, "rows": rows})
    return {"pairs": out}
