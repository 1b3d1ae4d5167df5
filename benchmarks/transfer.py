"""Transfer-learning benchmark: the PyTorch tutorial workflow vs. embed once + classical heads.

(a) baseline: the tutorial's "ConvNet as fixed feature extractor" — the same backbone
    (``embedstore.load_backbone``), final layer replaced by a new linear layer, body frozen (eval
    mode, no gradients), the head trained with Adam (lr 1e-3) for N epochs on RandomResizedCrop +
    horizontal-flip images; val accuracy after every epoch, the best one reported. The body runs
    through ``embedstore.Embedder`` (same device, precision and normalisation as (b)).
(b) embedstore: ``embedstore.embed`` once into a fresh store, then ``embedstore.classify``
    with every head (hyper-parameters chosen on a part of train only; scored on val).

    python benchmarks/transfer.py                                   # both sets, full settings
    python benchmarks/transfer.py --imagenette-per-class 30 --imagenette-epochs 25
    python benchmarks/transfer.py --sets hymenoptera --epochs 3     # quick

Prints a table and writes JSON to benchmarks/results/transfer.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import embedstore
from embedstore.heads import DEFAULT_MODELS, classify, parse_models
from embedstore.data import decode_image, discover
from embedstore.embedding import Embedder

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets"


# --------------------------------------------------------------------------- data


def select_items(folder: Path, per_class: int | None, val_per_class: int | None, seed: int) -> list[Any]:
    """The set's items, at most ``per_class`` train and ``val_per_class`` val images per class."""
    _, items = discover(folder)
    caps = {"train": per_class, "val": val_per_class}
    groups: dict[tuple[str, str], list[Any]] = {}
    for it in items:
        groups.setdefault((it.split, it.label), []).append(it)
    out = []
    for (split, _), group in sorted(groups.items()):
        cap = caps.get(split)
        if cap is not None and len(group) > cap:
            group = sorted(random.Random(seed).sample(group, cap), key=lambda it: it.rel)
        out.extend(group)
    return out


def write_list(items: list[Any], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for it in items:
            w.writerow([it.path, it.label, it.split])
    return path


class Images(torch.utils.data.Dataset):
    """(uint8 CHW tensor, class index) pairs through a torchvision transform."""

    def __init__(self, items: list[Any], classes: list[str], transform: Any):
        self.items, self.index, self.transform = items, {c: i for i, c in enumerate(classes)}, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        it = self.items[i]
        with open(it.path, "rb") as f:
            im = decode_image(f.read())
        return torch.as_tensor(np.asarray(self.transform(im))), self.index[it.label]


# --------------------------------------------------------------------------- (a) baseline


def run_baseline(items: list[Any], classes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The tutorial workflow: frozen body, new linear layer trained with Adam on augmented images."""
    from torchvision import transforms as T

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    bb = embedstore.load_backbone(args.backbone)
    body = Embedder(bb, device=args.device, precision=args.precision)  # frozen: eval mode, no grad
    head = nn.Linear(bb.dim, len(classes)).to(body.device)  # the replaced final layer
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    cfg = bb.data_config
    side = int(cfg["input_size"][-1])
    train_tf = T.Compose([
        T.RandomResizedCrop(side, interpolation=T.InterpolationMode(cfg["interpolation"])),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])
    train = [it for it in items if it.split == "train"]
    val = [it for it in items if it.split == "val"]
    loader = lambda data, tf, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        Images(data, classes, tf), batch_size=args.baseline_batch_size, shuffle=shuffle,
        num_workers=args.workers, persistent_workers=args.workers > 0)
    train_dl, val_dl = loader(train, train_tf, True), loader(val, bb.eval_transform(), False)
    history = []
    for epoch in range(args.epochs_for):
        te = time.perf_counter()
        head.train()
        total_loss = 0.0
        for x, y in train_dl:
            feats = torch.from_numpy(body(x)).to(body.device)
            loss = loss_fn(head(feats), y.to(body.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(y)
        head.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_dl:
                correct += int((head(torch.from_numpy(body(x)).to(body.device)).argmax(1).cpu() == y).sum())
        history.append({"epoch": epoch + 1, "train_loss": round(total_loss / len(train), 4),
                        "val_accuracy": round(correct / len(val), 4), "seconds": round(time.perf_counter() - te, 2)})
        print(f"    (a) epoch {epoch + 1}/{args.epochs_for}: loss {history[-1]['train_loss']:.3f} "
              f"val {history[-1]['val_accuracy']:.4f} ({history[-1]['seconds']:.0f}s)", file=sys.stderr, flush=True)
    best = max(history, key=lambda h: h["val_accuracy"])
    return {"epochs": args.epochs_for, "batch_size": args.baseline_batch_size, "optimizer": "Adam lr 1e-3",
            "precision": body.precision, "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
            "final_val_accuracy": history[-1]["val_accuracy"], "seconds": round(time.perf_counter() - t0, 2),
            "history": history}


# --------------------------------------------------------------------------- (b) embedstore


def run_embedstore(source: Path, store: Path, args: argparse.Namespace) -> dict[str, Any]:
    for stale in (store, Path(str(store) + ".lock")):
        stale.unlink(missing_ok=True)
    summary = embedstore.embed(source, store, backbone=args.backbone, device=args.device, precision=args.precision,
                               workers=args.workers, progress=False)
    Path(str(store) + ".lock").unlink(missing_ok=True)  # released by embed; keep the results folder clean
    t0 = time.perf_counter()
    report = classify(str(store), models=parse_models(args.models), preprocess=args.preprocess, seed=args.seed)
    classify_s = time.perf_counter() - t0
    heads = [{k: r[k] for k in ("model", "accuracy", "balanced_accuracy", "macro_f1", "fit_s", "predict_s", "params")
              if k in r} | ({"top5_accuracy": r["top5_accuracy"]} if "top5_accuracy" in r else {})
             for r in report.results]
    for h in heads:
        h["share_of_embed"] = round((h["fit_s"] + h["predict_s"]) / summary["seconds"], 4)
    return {"embed_s": summary["seconds"], "images_per_s": summary["images_per_s"], "precision": summary["precision"],
            "failed": summary["failed"], "classify_s": round(classify_s, 2),
            "total_s": round(summary["seconds"] + classify_s, 2), "heads": heads,
            "best": {"model": report.best["model"], "accuracy": report.best["accuracy"]},
            "classify_share_of_embed": round(classify_s / summary["seconds"], 4)}


# --------------------------------------------------------------------------- driver


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def run_set(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    folder = args.data / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} is absent: pass --data DIR holding {name}/train and {name}/val")
    per_class = args.imagenette_per_class if name == "imagenette" else None
    val_per_class = (args.imagenette_val_per_class or per_class) if name == "imagenette" else None
    args.epochs_for = args.imagenette_epochs if name == "imagenette" and args.imagenette_epochs else args.epochs
    items = select_items(folder, per_class, val_per_class, args.seed)
    classes = sorted({it.label for it in items})
    source = folder if per_class is None else write_list(items, tmp / f"{name}.csv")
    n_train = sum(it.split == "train" for it in items)
    print(f"{name}: {n_train} train / {len(items) - n_train} val images, {len(classes)} classes", file=sys.stderr)
    out: dict[str, Any] = {"train": n_train, "val": len(items) - n_train, "classes": len(classes),
                           "train_per_class_cap": per_class, "val_per_class_cap": val_per_class}
    print("  (b) embed + classify", file=sys.stderr, flush=True)
    out["embedstore"] = run_embedstore(source, args.results / f"transfer-{name}.h5", args)
    if not args.skip_baseline:
        print(f"  (a) tutorial baseline, {args.epochs_for} epochs", file=sys.stderr, flush=True)
        out["baseline"] = b = run_baseline(items, classes, args)
        e = out["embedstore"]
        out["speedup"] = round(b["seconds"] / e["total_s"], 1)
        out["targets"] = {
            "best_head_minus_baseline_points": round(100 * (e["best"]["accuracy"] - b["best_val_accuracy"]), 2),
            "within_half_point": e["best"]["accuracy"] >= b["best_val_accuracy"] - 0.005,
            "ten_times_faster": out["speedup"] >= 10,
            "max_head_share_of_embed": max(h["share_of_embed"] for h in e["heads"]),
        }
        if name == "hymenoptera":
            out["targets"]["best_head_at_least_95"] = e["best"]["accuracy"] >= 0.95
    return out


def print_table(results: dict[str, Any]) -> None:
    lines = [f"{'set':12s} {'workflow':28s} {'val acc':>8s} {'wall s':>8s}"]
    for name, r in results["sets"].items():
        if "baseline" in r:
            b = r["baseline"]
            lines.append(f"{name:12s} {'(a) tutorial, ' + str(b['epochs']) + ' epochs':28s} "
                         f"{b['best_val_accuracy']:8.4f} {b['seconds']:8.1f}")
        e = r["embedstore"]
        lines.append(f"{name:12s} {'(b) embed':28s} {'':8s} {e['embed_s']:8.1f}")
        for h in e["heads"]:
            lines.append(f"{name:12s} {'    + ' + h['model']:28s} {h['accuracy']:8.4f} "
                         f"{h['fit_s'] + h['predict_s']:8.2f}  ({100 * h['share_of_embed']:.2f}% of embed)")
        lines.append(f"{name:12s} {'(b) total, every head':28s} {e['best']['accuracy']:8.4f} {e['total_s']:8.1f}"
                     + (f"  speedup {r['speedup']}x" if "speedup" in r else ""))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding hymenoptera/ and imagenette/")
    p.add_argument("--sets", default="hymenoptera,imagenette")
    p.add_argument("--backbone", default=embedstore.DEFAULT_BACKBONE)
    p.add_argument("--epochs", type=int, default=25, help="baseline epochs (tutorial: 25)")
    p.add_argument("--imagenette-epochs", type=int, default=None, help="baseline epochs on imagenette (default --epochs)")
    p.add_argument("--imagenette-per-class", type=int, default=None, help="train images per class (default all)")
    p.add_argument("--imagenette-val-per-class", type=int, default=None, help="val images per class (default as train)")
    p.add_argument("--baseline-batch-size", type=int, default=32, help="baseline batch size (the tutorial uses 4)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--preprocess", default="l2")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=1, help="decode worker processes for both workflows")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default RESULTS/transfer.json)")
    args = p.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:] if argv is None else argv,
                               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "sets": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
            results["sets"][name] = run_set(name, args, Path(tmp))
    results["config"].pop("epochs_for", None)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = args.out or args.results / "transfer.json"
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
