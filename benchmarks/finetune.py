"""Fine-tune benchmark: frozen space + logistic regression vs. LP-FT of the last stages + re-embed.

Per data set:
(a) frozen: ``embedstore.embed`` into a fresh store, then ``classify(models=["logreg"])`` (C chosen
    on a part of train; scored on val and on a held-out test split);
(b) fine-tuned: ``embedstore.finetune`` (last N stages, a few epochs, early stopping on
    val), which re-embeds every image into a new space; then the same logistic regression on it.
    The network's own head is scored on val only, where its best epoch was chosen (optimistic);
    test is touched by neither run, so the test column is the fair comparison.

Splits: hymenoptera: all train; its val folder split in half per class (seeded) into val and test.
imagenette: N train, V val and T test images per class, val and test drawn from its val folder.

    python benchmarks/finetune.py                                  # default (~15-20 min on 2 cores)
    python benchmarks/finetune.py --sets hymenoptera --unfreeze 2 --epochs 3

Prints a table and writes JSON to benchmarks/results/finetune.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import embedstore
from embedstore.heads import classify
from embedstore.data import ImageItem, discover
from embedstore.finetuning import FinetuneConfig, finetune

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets"


def select(folder: Path, caps: dict[str, int | None], test_from_val: int | None, seed: int) -> list[ImageItem]:
    """Cap train/val images per class; move ``test_from_val`` (None: half) of each class's val images to test."""
    _, items = discover(folder)
    groups: dict[tuple[str, str], list[ImageItem]] = {}
    for it in items:
        groups.setdefault((it.split, it.label), []).append(it)
    out: list[ImageItem] = []
    for (split, _), group in sorted(groups.items()):
        group = sorted(group, key=lambda it: it.rel)
        random.Random(seed).shuffle(group)
        if split == "val":
            n_test = len(group) // 2 if test_from_val is None else test_from_val
            test, group = group[:n_test], group[n_test:]
            out += [ImageItem(it.path, it.rel, it.label, "test") for it in test]
        cap = caps.get(split)
        out += group[:cap] if cap is not None else group
    return sorted(out, key=lambda it: it.rel)


def write_list(items: list[ImageItem], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for it in items:
            w.writerow([it.path, it.label, it.split])
    return path


def logreg(store: Path, spaces: list[str], seed: int) -> tuple[dict[str, dict[str, float]], float]:
    """Val and test accuracy of classify's logistic regression per space, and its seconds."""
    t0 = time.perf_counter()
    report = classify(str(store), spaces=spaces, models=["logreg"], seed=seed)
    return ({r["space"]: {"val": r["accuracy"], "test": r["test"]["accuracy"], "C": r["params"].get("C")}
             for r in report.results}, round(time.perf_counter() - t0, 2))


def run_set(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    folder = args.data / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} is absent: pass --data DIR holding {name}/train and {name}/val")
    if name == "imagenette":
        items = select(folder, {"train": args.imagenette_per_class, "val": args.imagenette_val_per_class},
                       args.imagenette_test_per_class, args.seed)
    else:
        items = select(folder, {}, None, args.seed)
    counts = {s: sum(it.split == s for it in items) for s in ("train", "val", "test")}
    print(f"{name}: {counts} images, {len({it.label for it in items})} classes", file=sys.stderr, flush=True)
    store = args.results / f"finetune-{name}.h5"
    for stale in (store, Path(f"{store}.lock"), Path(f"{store}.journal"), Path(f"{store}.finetune")):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    emb = embedstore.embed(write_list(items, tmp / f"{name}.csv"), store, backbone=args.backbone, device=args.device,
                           precision=args.precision, workers=args.workers, progress=False)
    frozen = emb["space"]
    scores, classify_s = logreg(store, [frozen], args.seed)
    out: dict[str, Any] = {"images": counts, "failed": emb["failed"], "frozen": {
        "space": frozen, "embed_s": emb["seconds"], "classify_s": classify_s, "total_s": round(time.perf_counter() - t0, 2),
        "precision": emb["precision"], "logreg": scores[frozen]}, "finetuned": []}
    print(f"  frozen logreg: val {scores[frozen]['val']:.4f} test {scores[frozen]['test']:.4f} "
          f"({out['frozen']['total_s']:.0f}s)", file=sys.stderr, flush=True)
    for n in args.unfreeze:
        print(f"  fine-tune last {n} stage(s), {args.epochs} epochs", file=sys.stderr, flush=True)
        t1 = time.perf_counter()
        s = finetune(store, FinetuneConfig(space=frozen, out_space=f"{frozen}-ft{n}", unfreeze=n, epochs=args.epochs,
                                           lr=args.lr, batch_size=args.batch_size, device=args.device,
                                           precision=args.precision, workers=args.workers, patience=args.patience,
                                           seed=args.seed, progress=not args.quiet))
        scores, classify_s = logreg(store, [frozen, s["out_space"]], args.seed)
        out["finetuned"].append({
            "unfreeze": n, "trained_stages": s["trained_stages"], "trainable_parameters": s["trainable_parameters"],
            "precision": s["precision"], "epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"],
            "stopped_early": s["stopped_early"], "network_best_val_accuracy": s["best_val_accuracy"],
            "network_epoch0_val_accuracy": s["history"][0]["val_accuracy"],
            "probe_val_accuracy": s["frozen_probe_val_accuracy"], "logreg": scores[s["out_space"]],
            "train_s": s["train_seconds"], "reembed_s": s["embed_seconds"], "classify_s": classify_s,
            "total_s": round(time.perf_counter() - t1, 2), "history": s["history"]})
        r = out["finetuned"][-1]
        print(f"    network val {r['network_best_val_accuracy']:.4f} (epoch {r['best_epoch']}); logreg on new space: "
              f"val {r['logreg']['val']:.4f} test {r['logreg']['test']:.4f} ({r['total_s']:.0f}s)",
              file=sys.stderr, flush=True)
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    from embedstore.embedding import cpu_has_bf16

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "cpu_bf16": cpu_has_bf16(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def print_table(results: dict[str, Any]) -> None:
    rows = [("set", "workflow", "val acc", "test acc", "wall s")]
    for name, r in results["sets"].items():
        f = r["frozen"]
        rows.append((name, "frozen: embed + logreg", f"{f['logreg']['val']:.4f}", f"{f['logreg']['test']:.4f}",
                     f"{f['total_s']:.0f}"))
        for t in r["finetuned"]:
            label = f"fine-tune last {t['unfreeze']}, {t['epochs_run']} ep"
            rows.append((name, f"{label}: network head*", f"{t['network_best_val_accuracy']:.4f}", "-",
                         f"{t['train_s']:.0f}"))
            rows.append((name, f"{label}: re-embed + logreg", f"{t['logreg']['val']:.4f}",
                         f"{t['logreg']['test']:.4f}", f"{t['total_s']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print("* best epoch chosen on val (optimistic); wall s of fine-tune rows: training only / training + "
          "re-embedding + logreg (the frozen embed not included)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding hymenoptera/ and imagenette/")
    p.add_argument("--sets", default="hymenoptera,imagenette")
    p.add_argument("--backbone", default=embedstore.DEFAULT_BACKBONE)
    p.add_argument("--unfreeze", default="1,2", help="comma list: one fine-tune run per value")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--imagenette-per-class", type=int, default=30, help="train images per class")
    p.add_argument("--imagenette-val-per-class", type=int, default=20, help="val images per class (early stopping)")
    p.add_argument("--imagenette-test-per-class", type=int, default=30, help="held-out test images per class")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=1, help="decode worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress bars")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default RESULTS/finetune.json)")
    args = p.parse_args(argv)
    args.unfreeze = [int(x) for x in str(args.unfreeze).split(",") if x.strip()]
    args.results.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:] if argv is None else argv,
                               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "sets": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
            results["sets"][name] = run_set(name, args, Path(tmp))
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = args.out or args.results / "finetune.json"
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"wrote {out} ({results['wall_s']:.0f}s)")
    return results


if __name__ == "__main__":
    main()
