"""Embedding throughput: the usual tutorial workflow vs `embedstore embed` vs the model alone.

On the same files and backbone, in one run, each stage in its own process (clean peak RSS):
  (a) baseline  torchvision ImageFolder + DataLoader(batch_size=32, num_workers=2) + the model in
                fp32 under no_grad, features collected in a list (the transfer-learning tutorial);
  (b) embedstore `embedstore.embed` into a fresh HDF5 store (defaults: precision auto, draft decode);
  (c) ceiling   the model alone on synthetic tensors, in embedstore's configuration.
Prints images/s (median of --repeats), the ratios b/a and b/c, peak RSS, and how well (b) agrees
with the fp32 reference (a): median cosine, and a 5-fold linear-probe accuracy on each.

    python benchmarks/embed_throughput.py                      # imagenette val + hymenoptera
    python benchmarks/embed_throughput.py --datasets hymenoptera --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
SETS = {"imagenette": "imagenette/val", "hymenoptera": "hymenoptera"}


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


def file_list(folder: Path, limit: int | None) -> list[str]:
    from embedstore.data import discover

    _, items = discover(folder)
    items = items[:: max(1, len(items) // limit)][:limit] if limit else items
    return [it.path for it in items]


def stage_baseline(files: list[str], backbone: str, out: str) -> dict:
    """The tutorial: ImageFolder-style dataset, DataLoader(32, 2 workers), fp32 model, no_grad."""
    import torch
    from PIL import Image
    from timm.data import create_transform

    from embedstore import load_backbone

    bb = load_backbone(backbone)
    transform = create_transform(**bb.data_config)  # the model's own preprocessing, fp32 reference

    class Files(torch.utils.data.Dataset):  # what ImageFolder does, over the same file list
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return transform(Image.open(files[i]).convert("RGB")), 0

    loader = torch.utils.data.DataLoader(Files(), batch_size=32, num_workers=2)
    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            feats.append(bb.model(x))
    seconds = time.perf_counter() - t0
    np.save(out, torch.cat(feats).numpy())
    return {"images": len(files), "seconds": seconds}


def stage_embedstore(files: list[str], backbone: str, out: str) -> dict:
    import embedstore

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "files.csv"
        listing.write_text("\n".join(files))
        summary = embedstore.embed(listing, Path(tmp) / "bench.h5", backbone=backbone, progress=False)
        sp = embedstore.open_store(Path(tmp) / "bench.h5").space()
        order = {p: i for i, p in enumerate(sp.paths)}
        np.save(out, sp.vectors[[order[f] for f in files]].astype(np.float32))
    return {"images": summary["embedded"], "seconds": summary["stages"]["embed"], "wall": summary["seconds"],
            "precision": summary["precision"]}


def stage_ceiling(files: list[str], backbone: str, out: str) -> dict:
    import torch

    from embedstore import load_backbone
    from embedstore.embedding import Embedder

    embedder = Embedder(load_backbone(backbone))
    size = embedder.backbone.data_config["input_size"][1:]
    batch = torch.randint(0, 255, (64, 3, *size), dtype=torch.uint8)
    embedder(batch)  # warm-up
    n = max(256, min(len(files), 1024))
    t0 = time.perf_counter()
    for _ in range(n // 64):
        embedder(batch)
    return {"images": n // 64 * 64, "seconds": time.perf_counter() - t0, "precision": embedder.precision}


STAGES = {"baseline": stage_baseline, "embedstore": stage_embedstore, "ceiling": stage_ceiling}


def run_stage(stage: str, files_json: str, backbone: str, out: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--stage", stage, "--files", files_json, "--backbone", backbone, "--out", out],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linear_probe(X: np.ndarray, labels: list[str]) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    return float(cross_val_score(clf, X, labels, cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding the data sets")
    ap.add_argument("--datasets", default="imagenette,hymenoptera")
    ap.add_argument("--limit", type=int, default=None, help="use at most this many files per set (evenly spaced)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "embed_throughput.json")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.stage:
        files = json.loads(Path(args.files).read_text())
        result = STAGES[args.stage](files, args.backbone, args.out)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    import embedstore
    from embedstore._vectors import median_cosine

    rows = []
    for name in args.datasets.split(","):
        folder = args.data / SETS[name]
        if not folder.is_dir():
            print(f"skip {name}: {folder} is absent", file=sys.stderr)
            continue
        files = file_list(folder, args.limit)
        labels = [Path(f).parent.name for f in files]
        with tempfile.TemporaryDirectory() as tmp:
            files_json = Path(tmp) / "files.json"
            files_json.write_text(json.dumps(files))
            runs: dict[str, list[dict]] = {s: [] for s in STAGES}
            for r in range(args.repeats):
                for stage in STAGES:  # interleaved, so drift in machine load hits every stage alike
                    runs[stage].append(run_stage(stage, str(files_json), args.backbone, f"{tmp}/{stage}.npy"))
                    print(f"{name} repeat {r + 1} {stage}: {runs[stage][-1]}", file=sys.stderr)
            vec_a, vec_b = np.load(f"{tmp}/baseline.npy"), np.load(f"{tmp}/embedstore.npy")
        ips = {s: statistics.median(x["images"] / x["seconds"] for x in runs[s]) for s in STAGES}
        rows.append({
            "dataset": name,
            "images": len(files),
            "baseline_ips": round(ips["baseline"], 1),
            "embedstore_ips": round(ips["embedstore"], 1),
            "ceiling_ips": round(ips["ceiling"], 1),
            "b_over_a": round(ips["embedstore"] / ips["baseline"], 2),
            "b_over_c": round(ips["embedstore"] / ips["ceiling"], 2),
            "embedstore_wall_s": round(statistics.median(x["wall"] for x in runs["embedstore"]), 1),
            "peak_rss_mb": {s: max(x["peak_rss_mb"] for x in runs[s]) for s in STAGES},
            "precision": runs["embedstore"][0]["precision"],
            "median_cosine_vs_fp32": round(median_cosine(vec_a, vec_b), 4),
            "probe_acc_fp32": round(linear_probe(vec_a, labels), 4),
            "probe_acc_embedstore": round(linear_probe(vec_b, labels), 4),
            "repeats": args.repeats,
        })

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor(),
               "embedstore": embedstore.__version__}
    header = ["dataset", "images", "baseline img/s", "embedstore img/s", "ceiling img/s", "b/a", "b/c",
              "cos vs fp32", "probe fp32", "probe embedstore", "RSS MB a/b/c"]
    table = [[r["dataset"], r["images"], r["baseline_ips"], r["embedstore_ips"], r["ceiling_ips"], r["b_over_a"],
              r["b_over_c"], r["median_cosine_vs_fp32"], r["probe_acc_fp32"], r["probe_acc_embedstore"],
              "/".join(str(r["peak_rss_mb"][s]) for s in STAGES)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for line in [header, ["-" * w for w in widths], *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
