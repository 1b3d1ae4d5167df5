"""Scale-out overhead: the local engine vs the Ray engine on the same files, and the 100M-image plan.

(Moved here from benchmarks/scale.py, which now measures issue 17's store and index costs by size;
``python benchmarks/scale.py engines ...`` still runs this one. Results: results/scale_engines.json.)

On one machine (a local Ray instance with all its cores), in one process, each from a fresh store:
  local          ``embedstore.embed(..., engine="local")``
  ray 1x{C}cpu   one Ray worker actor with all C cores, ``--shards`` shards
  ray {C}x1cpu   C worker actors with one core each
  reruns         the same command again (nothing new: planning, skipping, merging only)
Checks that every Ray store holds the local store's rows and vectors, then prints a Markdown table
(wall seconds, images/s, overhead ratio vs local) and the 100M-image plan computed from the
measured per-worker throughput and the measured bytes per image of the store.

    python benchmarks/scale_engines.py                                   # ../shared/datasets/hymenoptera
    python benchmarks/scale_engines.py --data ../shared/datasets/imagenette/val --limit 2000
    python benchmarks/scale_engines.py --gpu-ips 2500                    # plan rows for a measured GPU rate
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def subset_csv(data: Path, limit: int | None, folder: Path) -> Path:
    """A CSV list of the first ``limit`` images (all when None), labels and splits kept."""
    from embedstore.data import discover

    _, items = discover(data)
    if limit:
        items = items[:: max(1, len(items) // limit)][:limit]
    out = folder / "list.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        for it in items:
            w.writerow([it.path, it.label, it.split])
    return out


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Rows and vectors of store b against store a."""
    from embedstore import open_store

    sa, sb = open_store(a).space(), open_store(b).space()
    va = dict(zip(sa.paths, sa.vectors.astype(np.float32)))
    vb = dict(zip(sb.paths, sb.vectors.astype(np.float32)))
    same = set(va) == set(vb) and len(sb) == len(set(sb.paths))
    diff = max(float(np.abs(va[p] - vb[p]).max()) for p in va) if same else float("nan")
    cos = [float(va[p] @ vb[p] / (np.linalg.norm(va[p]) * np.linalg.norm(vb[p]) + 1e-12)) for p in va] if same else [0]
    return {"same_rows": same, "rows": len(sb), "max_abs_diff": diff, "min_cosine": min(cos)}


def decode_rate(source: Path, backbone: str) -> tuple[float, float]:
    """(images/s that one core reads, decodes and transforms, no model; mean file bytes)."""
    from embedstore import discover, load_backbone
    from embedstore.data import ImageReader, draft_size

    bb = load_backbone(backbone)
    _, items = discover(source)
    reader = ImageReader(items, bb.eval_transform(), draft_size(bb.data_config))
    t0 = time.perf_counter()
    size = sum(reader[i].size for i in range(len(reader)))
    return len(reader) / (time.perf_counter() - t0), size / max(1, len(reader))


def plan(n_images: float, per_worker_ips: float, workers: int, bytes_per_image: float, dim: int,
         fixed_s: float, file_bytes: float) -> dict[str, Any]:
    """Wall time, storage and input bandwidth for ``n_images`` on ``workers`` workers."""
    hours = (n_images / (per_worker_ips * workers) + fixed_s) / 3600
    return {"workers": workers, "per_worker_ips": per_worker_ips, "hours": hours,
            "store_gb": n_images * bytes_per_image / 1e9, "dim": dim,
            "read_gb_per_s": per_worker_ips * workers * file_bytes / 1e9, "input_tb": n_images * file_bytes / 1e12}


def index_plan(n_images: float, dim: int) -> list[dict[str, Any]]:
    """Index sizes for n_images vectors (bytes; ids are 8 bytes each)."""
    nlist = 65536
    rows = []
    for name, code in (("IVF65536,Flat (float32)", 4 * dim), ("IVF65536,SQfp16", 2 * dim),
                       ("PCAR256,IVF65536,PQ64", 64), ("PCAR256,IVF65536,PQ32", 32)):
        quant_dim = 256 if name.startswith("PCAR256") else dim
        rows.append({"index": name, "ivfdata_gb": n_images * (code + 8) / 1e9,
                     "ram_gb": (nlist * quant_dim * 4 + (dim * 256 * 4 if quant_dim != dim else 0)) / 1e9,
                     "train_sample": 39 * nlist,
                     "train_ram_gb": 39 * nlist * dim * 4 / 1e9})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--limit", type=int, default=None, help="Use a subset of this many images.")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="Fresh runs per engine (median reported).")
    ap.add_argument("--gpu-ips", type=float, default=None,
                    help="Per-GPU images/s to plan with (measure it: embedstore embed --device cuda on one GPU). "
                         "Default: the measured decode rate per core x --cores-per-gpu (decode-bound GPU worker).")
    ap.add_argument("--cores-per-gpu", type=int, default=16, help="Decode cores next to each GPU worker.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_engines.json")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        sys.exit(f"{args.data} is absent: pass --data FOLDER")
    import ray

    import embedstore

    cores = len(os.sched_getaffinity(0))
    common = dict(backbone=args.backbone, batch_size=args.batch_size, progress=False)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp_dir:
        tmp = Path(tmp_dir)
        source = subset_csv(args.data, args.limit, tmp) if args.limit else args.data

        def run(name: str, store: Path, **kw: Any) -> dict[str, Any]:
            t0 = time.perf_counter()
            out = embedstore.embed(source, store, **common, **kw)
            wall = time.perf_counter() - t0
            row = {"run": name, "wall_s": round(wall, 2), "embedded": out["embedded"], "failed": out["failed"],
                   "images": out["images"], "images_per_s_wall": round((out["embedded"] + out["failed"]) / wall, 2),
                   "summary": out}
            runs.append(row)
            print(f"{name:<22} {wall:7.1f}s  {row['images_per_s_wall']:7.2f} img/s", flush=True)
            return out

        embedstore.load_backbone(args.backbone)  # warm the file cache: no run pays the first read
        decode_ips, file_bytes = decode_rate(source, args.backbone)
        print(f"decode, 1 core          {decode_ips:7.1f} img/s", flush=True)
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
        ray_init = time.perf_counter() - t0
        print(f"ray.init                {ray_init:7.1f}s", flush=True)
        local, one, many = tmp / "local.h5", tmp / "ray-1.h5", tmp / "ray-n.h5"
        for k in range(args.repeats):  # interleaved, so load from other processes hits all alike
            for p in (local, one, many):
                p.unlink(missing_ok=True)
            run("local", local)
            run(f"ray 1x{cores}cpu", one, engine="ray", shards=args.shards, cpus_per_worker=cores)
            run(f"ray {cores}x1cpu", many, engine="ray", shards=args.shards, cpus_per_worker=1)
        run("local rerun", local)
        run(f"ray 1x{cores}cpu rerun", one, engine="ray", shards=args.shards, cpus_per_worker=cores)
        ray.shutdown()
        checks = {"ray-1": compare(local, one), f"ray-{cores}": compare(local, many)}
        local_store = embedstore.open_store(local)
        bytes_per_image = local.stat().st_size / max(1, local_store.n_images)
        dim = local_store.space().dim

    names = list(dict.fromkeys(r["run"] for r in runs))
    table = []
    for name in names:
        mine = [r for r in runs if r["run"] == name]
        wall = float(np.median([r["wall_s"] for r in mine]))
        table.append({"run": name, "repeats": len(mine), "wall_s": wall, "walls": [r["wall_s"] for r in mine],
                      "embedded": mine[0]["embedded"], "images_per_s_wall": (mine[0]["embedded"] + mine[0]["failed"]) / wall,
                      "stages": mine[-1]["summary"]["stages"]})
    base = table[0]["wall_s"]
    for t in table:
        t["overhead_vs_local"] = round(t["wall_s"] / base, 2) if "rerun" not in t["run"] else None
    ray1 = [r["summary"] for r in runs if r["run"] == f"ray 1x{cores}cpu"]
    shard_ips = [s["images_per_s"] for out in ray1 for s in out["per_shard"] if s["images_per_s"]]
    per_worker = float(np.median(shard_ips))  # steady state inside a worker (model loaded)
    # startup + scheduling + merge: what a Ray run costs beyond its workers' steady embedding
    fixed = float(np.median([o["seconds"] - (o["embedded"] + o["failed"]) / per_worker for o in ray1]))
    plans = [plan(100e6, per_worker, n, bytes_per_image, dim, fixed, file_bytes) for n in (1, 64, 512)]
    gpu_ips = args.gpu_ips or decode_ips * args.cores_per_gpu
    plans += [plan(100e6, gpu_ips, n, bytes_per_image, dim, fixed, file_bytes) | {"gpu": True}
              for n in (8, 64, 256)]
    result = {
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "ray": ray.__version__, "torch": __import__("torch").__version__},
        "data": str(args.data), "limit": args.limit, "backbone": args.backbone, "shards": args.shards,
        "ray_init_s": round(ray_init, 2), "table": table, "runs": runs, "checks": checks,
        "per_worker_ips": round(per_worker, 2), "decode_ips_per_core": round(decode_ips, 1),
        "mean_file_bytes": round(file_bytes),
        "gpu_ips": round(gpu_ips, 1), "gpu_ips_source": "--gpu-ips" if args.gpu_ips else
        f"decode rate per core x {args.cores_per_gpu} cores (model assumed faster than decode on a GPU)", "fixed_overhead_s": round(fixed, 1),
        "bytes_per_image": round(bytes_per_image, 1), "dim": dim,
        "plan_100m": plans, "index_100m": index_plan(100e6, dim),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))

    print(f"\n{cores} cores, {args.backbone}, {runs[0]['images']} images from {args.data}, "
          f"{args.shards} shards, median of {args.repeats}; ray.init {ray_init:.1f}s (not counted below)\n")
    print("| run | wall s (median) | runs | images/s (wall) | embedded | overhead vs local | merge s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for t in table:
        ov = f"{t['overhead_vs_local']:.2f}x" if t["overhead_vs_local"] else "-"
        walls = " / ".join(f"{w:.1f}" for w in t["walls"])
        merge_s = t["stages"].get("merge")
        print(f"| {t['run']} | {t['wall_s']:.1f} | {walls} | {t['images_per_s_wall']:.1f} | {t['embedded']} | {ov} | "
              f"{merge_s if merge_s is not None else '-'} |")
    print(f"\nsame rows as local: {all(c['same_rows'] for c in checks.values())}; "
          f"max |diff| {max(c['max_abs_diff'] for c in checks.values()):.2e}; "
          f"min cosine {min(c['min_cosine'] for c in checks.values()):.5f}")
    print(f"steady per-worker throughput {per_worker:.1f} img/s ({cores} CPUs); fixed overhead {fixed:.1f}s; "
          f"{bytes_per_image:.0f} bytes/image in the store (dim {dim}); decode {decode_ips:.1f} img/s per core; "
          f"GPU worker rate {gpu_ips:.0f} img/s ({result['gpu_ips_source']})\n")
    print("| 100M images on | img/s per worker | hours | store GB | input read GB/s |")
    print("|---|---:|---:|---:|---:|")
    for p in plans:
        kind = "GPU workers" if p.get("gpu") else f"{cores}-CPU workers"
        print(f"| {p['workers']} {kind} | {p['per_worker_ips']:.0f} | {p['hours']:,.2f} | {p['store_gb']:,.0f} | "
              f"{p['read_gb_per_s']:.3f} |")
    print("\n| index for 100M | ivfdata GB (disk, mmap) | RAM GB (quantizer) | train sample | train RAM GB |")
    print("|---|---:|---:|---:|---:|")
    for r in result["index_100m"]:
        print(f"| {r['index']} | {r['ivfdata_gb']:,.1f} | {r['ram_gb']:.2f} | {r['train_sample']:,} | "
              f"{r['train_ram_gb']:.1f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
