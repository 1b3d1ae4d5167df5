"""Curation benchmark: does ``embedstore audit`` find injected label noise and leaks between splits?

For each shared set (hymenoptera, imagenette; every image of train and val):

1. leaks: N val images (seeded) are copied into train, resized to 3/4 of their size and re-encoded
   at JPEG quality 60 (a re-upload), written under ``--work`` (never into the shared folder);
2. the set and the copies are embedded once with the default backbone (``efficientnet_lite0``,
   offline) from a CSV list into ``WORK/<set>/clean.h5``; a rerun finds every image embedded already;
3. label noise: a copy of that store's vectors with 5 % of the labels flipped at random (seeded; each
   to another class, uniformly) is written with ``embedstore.add_vectors`` (same vectors, same paths,
   only those labels changed);
4. ``embedstore.audit`` on the noisy copy (head logreg, 5 folds, every issue listed), and on the
   clean store (the label issues the set has without injected noise, for reference).

Reported: precision and recall of the label-issue ranking at k = the number of flipped labels
(the top k of cleanlab's ranking against the flipped rows; with k relevant rows the two are equal
when cleanlab flags at least k), precision and recall of everything cleanlab flags, how many of the
top-k misses are flagged in the clean store too (the set's own label issues, not noise), and how many
planted leaks are found out of N, with the other cross-split pairs (not planted: near-duplicates the
set itself has across its splits, or look-alikes), also at stricter thresholds than the audit's.

    python benchmarks/curation.py                            # both sets (imagenette: minutes to embed)
    python benchmarks/curation.py --sets hymenoptera         # quick

Prints a table and writes JSON to benchmarks/results/curation.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import embedstore
from embedstore.data import discover
from embedstore.heads.rows import read_vectors

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets"
DEFAULT_WORK = REPO.parent / "scratch" / "curation"
SWEEP = (0.825, 0.85, 0.875, 0.9, 0.925, 0.95)  # leak thresholds also scored (pairs at or above the audit's cut)


# --------------------------------------------------------------------------- data


def plant_leaks(items: list[Any], folder: Path, n: int, seed: int) -> list[tuple[str, str, str]]:
    """Copy ``n`` val images (seeded) into ``folder``, resized to 3/4 and saved at JPEG quality 60.

    Returns (original path, copy path, label) per copy; existing copies are kept (same seed, same files).
    """
    val = sorted((it for it in items if it.split == "val"), key=lambda it: it.path)
    out = []
    for i, it in enumerate(random.Random(seed).sample(val, n)):
        dst = folder / it.label / f"leak_{i:02d}.jpg"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(it.path) as im:
                im = im.convert("RGB")
                im.resize((max(1, im.width * 3 // 4), max(1, im.height * 3 // 4)), Image.BICUBIC).save(
                    dst, "JPEG", quality=60)
        out.append((it.path, str(dst), it.label))
    return out


def write_list(items: list[Any], leaks: list[tuple[str, str, str]], path: Path) -> Path:
    """The CSV list embedded: every image of the set (absolute paths) and the copies, in train."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for it in items:
            w.writerow([it.path, it.label, it.split])
        for _, copy, label in leaks:
            w.writerow([copy, label, "train"])
    return path


def noisy_copy(clean: Path, out: Path, rate: float, seed: int) -> tuple[Path, set[str]]:
    """``out``: the clean store's vectors with ``rate`` of the labels flipped (seeded), by add_vectors.
    Returns it and the stored paths of the flipped rows."""
    for stale in (out, Path(f"{out}.lock")):
        stale.unlink(missing_ok=True)
    st = embedstore.open_store(clean)
    sp = st.space()
    labels, paths = sp.labels.astype(object), sp.paths
    classes = sorted(set(labels.tolist()) - {""})
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(labels != "")
    flip = rng.choice(labelled, round(rate * len(labelled)), replace=False)
    for i in flip:
        others = [c for c in classes if c != labels[i]]
        labels[i] = others[rng.integers(len(others))]
    embedstore.add_vectors(out, read_vectors(sp, np.arange(len(sp))), list(paths), space=sp.name,
                           labels=list(labels), splits=list(sp.splits), root=st.root,
                           source=f"{clean.name} with {rate:.0%} of labels flipped (seed {seed})")
    return out, {str(paths[i]) for i in flip}


# --------------------------------------------------------------------------- scoring


def label_scores(issues: list[dict[str, Any]], flipped: set[str], clean_flagged: set[str]) -> dict[str, Any]:
    k = len(flipped)
    ranked = [i["path"] for i in issues]
    top = ranked[:k]
    hits_k = sum(p in flipped for p in top)
    hits_all = sum(p in flipped for p in ranked)
    misses = [p for p in top if p not in flipped]
    return {
        "flipped": k, "flagged": len(ranked),
        "precision_at_k": round(hits_k / k, 4) if k else None, "recall_at_k": round(hits_k / k, 4) if k else None,
        "hits_at_k": hits_k,
        "precision_flagged": round(hits_all / len(ranked), 4) if ranked else None,
        "recall_flagged": round(hits_all / k, 4) if k else None,
        "top_k_misses_flagged_in_clean_store": sum(p in clean_flagged for p in misses),
        "precision_at_k_not_counting_the_sets_own_issues": round(hits_k / max(1, k - sum(p in clean_flagged
                                                                                         for p in misses)), 4),
    }


def pair_cosine(store: Path, a: str, b: str) -> float:
    """Cosine of two stored images' vectors (for planted pairs the audit missed: how far below the cut)."""
    st = embedstore.open_store(store)
    sp = st.space()
    v = read_vectors(sp, sp.positions_of(st.rows_of([a, b])), normalize=True)
    return round(float(v[0] @ v[1]), 6)


def leak_scores(leaks: list[dict[str, Any]], planted: list[tuple[str, str, str]], store: Path) -> dict[str, Any]:
    root = embedstore.open_store(store).root

    def stored(p: str) -> str:
        return os.path.relpath(p, root) if p.startswith(root + os.sep) else p

    want = {frozenset((stored(a), stored(b))) for a, b, _ in planted}
    pairs = [frozenset((p["a"]["path"], p["b"]["path"])) for p in leaks]
    found = want & set(pairs)
    copies = {stored(b) for _, b, _ in planted}
    other = [p for p, pair in zip(leaks, pairs) if pair not in want]
    planted_found = [p for p, pair in zip(leaks, pairs) if pair in want]
    return {"planted": len(want), "found": len(found), "pairs": len(leaks), "other_pairs": len(other),
            "other_pairs_with_a_copy": sum(bool(copies & {p["a"]["path"], p["b"]["path"]}) for p in other),
            "lowest_planted_cosine": min((p["score"] for p in planted_found), default=None),
            "missed": [{"pair": sorted(w), "cosine": pair_cosine(store, *sorted(w))} for w in want - found],
            "other_examples": [{"score": p["score"], "a": p["a"]["path"], "b": p["b"]["path"]} for p in other[:10]],
            "by_threshold": [{"threshold": t, "found": sum(p["score"] >= t for p in planted_found),
                              "other_pairs": sum(p["score"] >= t for p in other)} for t in SWEEP]}


# --------------------------------------------------------------------------- driver


def machine() -> dict[str, Any]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        cpu = platform.processor()
    import cleanlab
    import sklearn

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "cleanlab": cleanlab.__version__, "scikit-learn": sklearn.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def run_set(name: str, args: argparse.Namespace) -> dict[str, Any]:
    folder = args.data / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} is absent: pass --data DIR holding {name}/train and {name}/val")
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    _, items = discover(folder)
    items = [it for it in items if it.split in ("train", "val") and not it.refusal]
    planted = plant_leaks(items, work / "leaks", args.leaks, args.seed)
    source = write_list(items, planted, work / "list.csv")
    clean = work / "clean.h5"
    print(f"{name}: {len(items)} images + {len(planted)} planted copies -> {clean}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    emb = embedstore.embed(source, clean, backbone=args.backbone, workers=args.workers, progress=False)
    embed_s = time.perf_counter() - t0
    noisy, flipped = noisy_copy(clean, work / f"noisy-{args.seed}.h5", args.noise, args.seed)
    opts = {"head": args.head, "folds": args.folds, "seed": args.seed, "top": None}
    print(f"  audit of the noisy copy ({len(flipped)} labels flipped)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    r = embedstore.audit(noisy, **opts)
    audit_s = time.perf_counter() - t0
    print("  audit of the clean store", file=sys.stderr, flush=True)
    base = embedstore.audit(clean, **opts)
    return {
        "images": len(items), "classes": len({it.label for it in items}), "embedded": len(r.outliers),
        "embed_s": round(embed_s, 1), "newly_embedded": emb.get("embedded"), "audit_s": round(audit_s, 1),
        "audit_stages": r.stages, "folds": r.summary["folds"], "head": args.head,
        "labels": label_scores(r.label_issues, flipped, {i["path"] for i in base.label_issues}),
        "clean_store_flagged": base.summary["label_issues"],
        "leaks": leak_scores(r.leaks, planted, noisy), "leak_threshold": r.summary["leak_threshold"],
        "outliers_top5": [{"path": o["path"], "label": o["label"], "score": o["score"]} for o in r.outliers[:5]],
    }


def print_table(results: dict[str, Any]) -> None:
    lines = [f"{'set':12s} {'images':>7s} {'flipped':>8s} {'P@k':>6s} {'R@k':>6s} {'flagged':>8s} {'P(flag)':>8s} "
             f"{'R(flag)':>8s} {'leaks found':>12s} {'other pairs':>12s} {'audit s':>8s}"]
    for name, r in results["sets"].items():
        lab, lk = r["labels"], r["leaks"]
        lines.append(f"{name:12s} {r['embedded']:7d} {lab['flipped']:8d} {lab['precision_at_k']:6.3f} "
                     f"{lab['recall_at_k']:6.3f} {lab['flagged']:8d} {lab['precision_flagged'] or 0:8.3f} "
                     f"{lab['recall_flagged']:8.3f} {str(lk['found']) + ' / ' + str(lk['planted']):>12s} "
                     f"{lk['other_pairs']:12d} {r['audit_s']:8.1f}")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding hymenoptera/ and imagenette/")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="stores, lists and planted copies (kept for reruns)")
    p.add_argument("--sets", default="hymenoptera,imagenette")
    p.add_argument("--backbone", default=embedstore.DEFAULT_BACKBONE)
    p.add_argument("--noise", type=float, default=0.05, help="share of labels flipped")
    p.add_argument("--leaks", type=int, default=20, help="val images copied into train")
    p.add_argument("--head", default="logreg")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="decode worker processes (default: embed's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "curation.json")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:] if argv is None else argv,
                               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "sets": {}}
    t0 = time.perf_counter()
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        results["sets"][name] = run_set(name, args)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
