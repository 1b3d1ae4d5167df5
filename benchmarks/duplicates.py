"""Calibrate ``embedstore duplicates``' default threshold on real near-duplicates.

Takes N originals from the shared photo sets (hymenoptera train+val and imagenette val), makes
five modified copies of each (JPEG q=60; resized to 160 px, saved at q=90; centre crop 90 %;
160 px + q=60; crop + 160 px + q=60), adds other photos of the sets (distractors), embeds all
with the default backbone (``efficientnet_lite0``, pretrained weights), then for each threshold of
a grid scores (``sklearn.metrics``) the pairs ``duplicates`` links directly (its exact k-NN graph
cut at the threshold) against the true pairs (an original and its copies, and the copies among
themselves): precision, recall, F1, recall of original-copy pairs and per modification; and the
groups :func:`embedstore.search.duplicates` prints (pairs sharing a group; groups of one photo
only). Chooses the threshold with the rule in :func:`choose`.

    python benchmarks/duplicates.py                                  # 40 + 40 originals: 600 images
    python benchmarks/duplicates.py --per-set 10 --distractors 20    # quick

The shared sets are read in place and copied only into a temporary folder (never into the
repository). Prints a table and writes JSON to benchmarks/results/duplicates.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets"
SETS = {"hymenoptera": ("train", "val"), "imagenette": ("val",)}
GRID = (0.55, 0.6, 0.625, 0.65, 0.675, 0.7, 0.725, 0.75, 0.775, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95)


# --------------------------------------------------------------------------- modifications


def _resize(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)


def _crop(img: Image.Image, frac: float) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * frac), round(h * frac)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


MODS: dict[str, tuple[Callable[[Image.Image], Image.Image], int]] = {  # name: (change, JPEG quality saved at)
    "jpeg60": (lambda im: im, 60),
    "resize160": (lambda im: _resize(im, 160), 90),
    "crop90": (lambda im: _crop(im, 0.9), 90),
    "resize160_jpeg60": (lambda im: _resize(im, 160), 60),
    "crop90_resize160_jpeg60": (lambda im: _resize(_crop(im, 0.9), 160), 60),
}


# --------------------------------------------------------------------------- data


def photos(data: Path, name: str) -> list[Path]:
    out: list[Path] = []
    for split in SETS[name]:
        out.extend(sorted(p for p in (data / name / split).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
    return out


def build_folder(data: Path, work: Path, per_set: int, distractors: int, seed: int) -> dict[str, int]:
    """Fill ``work`` (a temporary folder) with originals, copies and distractors; returns file name -> family
    (-1 for a distractor)."""
    rng = random.Random(seed)
    family: dict[str, int] = {}
    fam = 0
    pools = {name: rng.sample(photos(data, name), len(photos(data, name))) for name in SETS}
    originals = [p for name in SETS for p in pools[name][:per_set]]
    rest = [p for name in SETS for p in pools[name][per_set:]]
    rng.shuffle(rest)
    for p in originals:
        stem = f"f{fam:04d}"
        shutil.copy(p, work / f"{stem}_orig{p.suffix.lower()}")
        family[f"{stem}_orig{p.suffix.lower()}"] = fam
        with Image.open(p) as im:
            im = im.convert("RGB")
            for mod, (fn, quality) in MODS.items():
                name = f"{stem}_{mod}.jpg"  # saved as a JPEG, as a re-upload would be
                fn(im).save(work / name, "JPEG", quality=quality)
                family[name] = fam
        fam += 1
    for i, p in enumerate(rest[:distractors]):
        name = f"x{i:04d}{p.suffix.lower()}"
        shutil.copy(p, work / name)
        family[name] = -1
    return family


# --------------------------------------------------------------------------- scoring


def knn_edges(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges ``duplicates`` draws before its threshold: each image to its k nearest others
    (exact), as (i, j, cosine) with i < j, each pair once."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :k]
    i = np.repeat(np.arange(len(v)), nn.shape[1])
    j = nn.ravel()
    a, b = np.minimum(i, j), np.maximum(i, j)
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return pairs[:, 0], pairs[:, 1], sim[pairs[:, 0], pairs[:, 1]]


def score_pairs(edges: tuple[np.ndarray, np.ndarray, np.ndarray], threshold: float, family: dict[str, int],
                names: list[str]) -> dict[str, Any]:
    """Pairs ``duplicates`` links directly at ``threshold`` against the true pairs (one family)."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    n = len(names)
    fam = np.array([family[x] for x in names])
    is_orig = np.array(["_orig" in x for x in names])
    i, j = np.triu_indices(n, 1)
    y_true = (fam[i] >= 0) & (fam[i] == fam[j])
    linked = np.zeros((n, n), bool)
    a, b, sim = edges
    keep = sim >= threshold
    linked[a[keep], b[keep]] = True
    y_pred = linked[i, j]
    oc = y_true & (is_orig[i] | is_orig[j])  # original-copy pairs
    per_mod = {}
    for mod in MODS:
        m = oc & np.array([x.endswith(f"_{mod}.jpg") for x in names])[np.where(is_orig[i], j, i)]
        per_mod[mod] = float(y_pred[m].mean()) if m.any() else 0.0
    return {
        "precision": float(precision_score(y_true, y_pred, zero_division=1.0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0.0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0.0)),
        "recall_original_copy": float(y_pred[oc].mean()) if oc.any() else 0.0,
        "pairs_linked": int(y_pred.sum()),
        "false_pairs": int((y_pred & ~y_true).sum()),
        "per_modification": per_mod,
    }


def score_groups(groups: list[dict[str, Any]], family: dict[str, int], names: list[str]) -> dict[str, Any]:
    """What the command prints: groups (connected components); a pair counts when both share a group."""
    where = {x: i for i, x in enumerate(names)}
    group_of = np.full(len(names), -1)
    for g, grp in enumerate(groups):
        for m in grp["members"]:
            group_of[where[os.path.basename(m["path"])]] = g
    fam = np.array([family[x] for x in names])
    i, j = np.triu_indices(len(names), 1)
    y_true = (fam[i] >= 0) & (fam[i] == fam[j])
    y_pred = (group_of[i] >= 0) & (group_of[i] == group_of[j])
    pure = sum(len({family[os.path.basename(m["path"])] for m in g["members"]}) == 1
               and family[os.path.basename(g["members"][0]["path"])] >= 0 for g in groups)
    return {"groups": len(groups), "pure_groups": int(pure),
            "group_precision": float((y_pred & y_true).sum() / max(1, y_pred.sum())),
            "group_recall": float((y_pred & y_true).sum() / max(1, y_true.sum()))}


def original_copy_cosines(vectors: np.ndarray, family: dict[str, int], names: list[str]) -> dict[str, dict[str, float]]:
    """Per modification: min, 5th percentile and median cosine of an original and its copy."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    where = {x: i for i, x in enumerate(names)}
    orig = {family[x]: where[x] for x in names if "_orig" in x}
    out = {}
    for mod in MODS:
        c = np.array([float(v[orig[family[x]]] @ v[where[x]]) for x in names if x.endswith(f"_{mod}.jpg")])
        out[mod] = {"min": round(float(c.min()), 4), "p05": round(float(np.percentile(c, 5)), 4),
                    "median": round(float(np.median(c)), 4)}
    return out


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def choose(rows: list[dict[str, Any]], min_precision: float, slack: float = 0.01) -> dict[str, Any]:
    """The highest threshold whose original-copy recall is within ``slack`` of the best one among
    thresholds where both the directly linked pairs and the pairs sharing a printed group are at
    least ``min_precision`` precise (the command prints groups; one false link merges two families,
    and false links grow with the collection's size); the most precise one when none qualifies."""
    precise = lambda r: min(r["precision"], r["group_precision"])  # noqa: E731
    ok = [r for r in rows if precise(r) >= min_precision]
    if not ok:
        return max(rows, key=lambda r: (precise(r), r["threshold"]))
    best = max(r["recall_original_copy"] for r in ok)
    return max((r for r in ok if r["recall_original_copy"] >= best - slack), key=lambda r: r["threshold"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--per-set", type=int, default=40, help="originals from each set")
    ap.add_argument("--distractors", type=int, default=120, help="other photos of the sets, no copies")
    ap.add_argument("--backbone", default=None, help="default: embedstore's default backbone")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--min-precision", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "duplicates.json")
    args = ap.parse_args(argv)
    for name in SETS:
        if not (args.data / name).is_dir():
            print(f"{args.data / name} is missing: pass --data DIR holding {', '.join(SETS)}", file=sys.stderr)
            return 2

    import torch

    import embedstore
    from embedstore.search import DUPLICATES_THRESHOLD, duplicates

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    backbone = args.backbone or embedstore.DEFAULT_BACKBONE
    with tempfile.TemporaryDirectory(prefix="embedstore-dups-") as tmp:
        work = Path(tmp) / "images"
        work.mkdir()
        t0 = time.perf_counter()
        family = build_folder(args.data, work, args.per_set, args.distractors, args.seed)
        t_make = time.perf_counter() - t0
        store = Path(tmp) / "dups.h5"
        summary = embedstore.embed(work, store, backbone=backbone, device=args.device, progress=True)
        sp = embedstore.open_store(store).space()
        names = [os.path.basename(p) for p in sp.paths]
        edges = knn_edges(np.asarray(sp.vectors, np.float32), args.k)
        rows = []
        for t in sorted(set(GRID) | {DUPLICATES_THRESHOLD}):
            res = duplicates(store, threshold=t, k=args.k)
            rows.append({"threshold": t, **score_pairs(edges, t, family, names),
                         **score_groups(res["groups"], family, names)})
        cosines = original_copy_cosines(np.asarray(sp.vectors, np.float32), family, names)
    best = choose(rows, args.min_precision)
    result = {
        "backbone": backbone,
        "device": summary["device"],
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "originals": 2 * args.per_set,
        "copies_per_original": list(MODS),
        "distractors": args.distractors,
        "images": summary["images"],
        "embedded": summary["embedded"],
        "embed_seconds": summary["seconds"],
        "make_copies_seconds": round(t_make, 2),
        "k": args.k,
        "min_precision": args.min_precision,
        "current_default": DUPLICATES_THRESHOLD,
        "chosen": best["threshold"],
        "rows": rows,
        "original_copy_cosine": cosines,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['images']} images ({result['originals']} originals x {len(MODS)} copies + {args.distractors} "
          f"distractors), {backbone} on {result['cpu']}, embedded in {summary['seconds']:.0f}s")
    print("cosine of an original and its copy (min / 5% / median):",
          ", ".join(f"{m} {c['min']:.3f} / {c['p05']:.3f} / {c['median']:.3f}" for m, c in cosines.items()))
    print("pairs linked directly (precision, recall, original-copy recall, false pairs, recall per modification) "
          "and groups (pure groups of one family / all, precision and recall of same-group pairs):")
    head = ["threshold", "precision", "recall", "orig-copy", "false", *MODS, "groups pure/all", "grp P", "grp R"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join([f"{r['threshold']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                                 f"{r['recall_original_copy']:.3f}", str(r["false_pairs"]),
                                 *(f"{r['per_modification'][m]:.2f}" for m in MODS),
                                 f"{r['pure_groups']}/{r['groups']}", f"{r['group_precision']:.3f}",
                                 f"{r['group_recall']:.3f}"]) + " |")
    print(f"chosen threshold (best original-copy recall with pair and group precision >= {args.min_precision}): "
          f"{best['threshold']} (precision {best['precision']:.3f}, recall {best['recall']:.3f}, original-copy "
          f"recall {best['recall_original_copy']:.3f}, group precision {best['group_precision']:.3f}); "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
