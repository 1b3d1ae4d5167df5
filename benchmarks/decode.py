"""Decode + eval transform per core: Pillow (the reference) vs torchvision's JPEG decoder (issue 19).

For each data set, in one process with one thread (``torch.set_num_threads(1)``), the files read
into memory first (no disk in the timing), each path decodes and transforms every file to the
model's uint8 pixels; images/s is the median of ``--repeats`` passes (the paths take turns):
  pillow       ``decoder="pillow"``: Pillow (draft mode for large JPEGs) + timm's eval transform
  torchvision  ``decoder="torchvision"``: every 8-bit colour JPEG through torchvision.io.decode_jpeg
               at full size + the transform replayed on the uint8 tensor (Pillow for the rest)
  auto         ``decoder="auto"``: torchvision where Pillow's draft mode would not shrink the file,
               Pillow (draft mode) for the rest; the transform on the uint8 tensor
Also per set: the pixel difference of torchvision and auto against pillow (mean and max absolute
difference over all pixels; the worst image's mean), and the images by draft scale.

    python benchmarks/decode.py --limit 0                           # imagenette val + hymenoptera
    python benchmarks/decode.py --data large-upscaled=FOLDER --limit 0

The two large sets in results/decode.json are not real large photos: 50 hymenoptera photos each,
upscaled with Pillow LANCZOS to 1000 px (medium-upscaled, draft scale 2) and to 3000 px on the long
side (large-upscaled, ~3000x2000, draft scale 4-8), saved as JPEG quality 90 (not in the repository).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
SETS = {"imagenette": DATA / "imagenette" / "val", "hymenoptera": DATA / "hymenoptera"}
PATHS = ("pillow", "torchvision", "auto")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor()


def file_bytes(folder: Path, limit: int) -> list[bytes]:
    from embedstore.data import discover

    _, items = discover(folder)
    items = items[:: max(1, len(items) // limit)][:limit] if limit else items
    return [Path(it.path).read_bytes() for it in items]


def draft_scale(data: bytes, min_size: int) -> int:
    """The scale Pillow's draft mode would decode this JPEG at (1 for other formats)."""
    import io

    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except OSError:
        return 0
    if im.format != "JPEG":
        return 1
    scale = min(im.width // min_size, im.height // min_size)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def run_set(name: str, blobs: list[bytes], transform, min_size: int, repeats: int) -> dict:
    import torch

    from embedstore.data import Decoder

    decoders = {p: Decoder(transform, min_size, p) for p in PATHS}
    pixels: dict[str, list] = {}
    for p, dec in decoders.items():  # one untimed pass: outputs for the comparison, warm caches
        out = []
        for b in blobs:
            try:
                out.append(dec(b))
            except Exception:  # noqa: BLE001 - a bad file is skipped the same way in every path
                out.append(None)
        pixels[p] = out
    rates: dict[str, list[float]] = {p: [] for p in decoders}
    for _ in range(repeats):  # the paths take turns, so a busy spell on a shared machine hits each alike
        for p, dec in decoders.items():
            t0 = time.perf_counter()
            for b in blobs:
                try:
                    dec(b)
                except Exception:  # noqa: BLE001
                    pass
            rates[p].append(len(blobs) / (time.perf_counter() - t0))
    ips = {p: round(statistics.median(r), 1) for p, r in rates.items()}
    diff = {}
    for p in ("torchvision", "auto"):
        means, worst, total, n = [], 0, 0.0, 0
        for a, b in zip(pixels["pillow"], pixels[p]):
            if a is None or b is None or a.shape != b.shape:
                continue
            d = (a.to(torch.int16) - b.to(torch.int16)).abs()
            means.append(d.float().mean().item())
            worst = max(worst, int(d.max()))
            total, n = total + d.float().sum().item(), n + d.numel()
        diff[p] = {"mean_abs": round(total / max(n, 1), 4), "worst_image_mean_abs": round(max(means, default=0), 4),
                   "max_abs": worst}
    scales = Counter(draft_scale(b, min_size) for b in blobs)
    return {"dataset": name, "images": len(blobs), "ips": ips,
            "speedup_vs_pillow": {p: round(ips[p] / ips["pillow"], 2) for p in ("torchvision", "auto")},
            "pixel_diff_vs_pillow": diff, "draft_scales": {str(k): v for k, v in sorted(scales.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", default=[f"{k}={v}" for k, v in SETS.items()],
                    help="NAME=FOLDER pairs (default: imagenette val and hymenoptera)")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="whose data config (default: the default backbone)")
    ap.add_argument("--limit", type=int, default=1000, help="files per set, evenly spaced (0: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "decode.json")
    args = ap.parse_args()

    import torch

    from embedstore import load_backbone
    from embedstore.data import draft_size

    torch.set_num_threads(1)
    bb = load_backbone(args.backbone, weights="random")
    transform, min_size = bb.eval_transform(), draft_size(bb.data_config)
    rows = []
    for spec in args.data:
        name, _, folder = spec.partition("=")
        blobs = file_bytes(Path(folder), args.limit)
        row = run_set(name, blobs, transform, min_size, args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    machine = {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": 1, "platform": platform.platform(),
               "python": sys.version.split()[0], "torch": torch.__version__}
    import PIL
    import torchvision

    machine.update(torchvision=torchvision.__version__, pillow=PIL.__version__)
    config = {"backbone": args.backbone, "data_config": bb.data_config, "draft_size": min_size, "repeats": args.repeats}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json_out.read_text()) if args.json_out.exists() else {}
    merged = {r["dataset"]: r for r in previous.get("results", [])} | {r["dataset"]: r for r in rows}
    args.json_out.write_text(json.dumps({"machine": machine, "config": config, "results": list(merged.values())},
                                        indent=2) + "\n")
    print("| set | images | pillow img/s | torchvision img/s | auto img/s | auto / pillow | auto max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in merged.values():
        print(f"| {r['dataset']} | {r['images']} | {r['ips']['pillow']} | {r['ips']['torchvision']} | {r['ips']['auto']} "
              f"| {r['speedup_vs_pillow']['auto']} | {r['pixel_diff_vs_pillow']['auto']['max_abs']} |")


if __name__ == "__main__":
    main()
