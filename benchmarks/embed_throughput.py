"""Embedding throughput: the tutorial loop, embedstore before and after, and each runtime's model alone.

On the same files and backbone, in one run, every stage in its own process, the stages of a repeat
taking turns (so drift in the machine's load hits them alike):

  tutorial   torchvision-style Dataset + DataLoader(batch_size=32, num_workers=2) + the model in fp32
             under no_grad (the transfer-learning tutorial's loop), features collected in a list;
  today      ``embedstore.embed`` as it was before the runtimes and the new decoding (``--today``:
             a git revision, run from a temporary worktree): eager torch, Pillow decoding;
  model:*    the model alone on a batch of 64 of the set's own images, already decoded: eager torch
             fp32 (channels-last), eager torch bf16 autocast (CPUs with AMX/AVX512-BF16), ONNX Runtime
             and OpenVINO in fp32 and in bf16 (the exported graph embedstore caches); cosine to eager
             fp32 on those images;
  decode     embedstore's reader alone, on one core (torch threads 1, no worker): read, hash, decode
             and transform each file, as a decode worker does; with the fastest model alone it gives the
             bound of a pipeline on these cores: ``cores / (cores / model + 1 / decode)`` images/s;
  auto       ``embedstore.embed`` now, with its defaults (``runtime="auto"``, the new decoding).

Prints images/s (median of --repeats), the ratios auto/today, auto/best model alone and
auto/tutorial, the cosine of each path's vectors to the tutorial's fp32 ones, peak RSS, and the CPU
(model name and its bf16/AVX flags). Sets: imagenette val (224 px JPEGs), hymenoptera (~500 px
photos), and ``--large DIR`` (``--make-large DIR`` writes one: hymenoptera photos upscaled to
3000 px on the long side with Pillow's LANCZOS, JPEG quality 90 -- upscaled, not real large photos).

    python benchmarks/embed_throughput.py --limit 1000 --repeats 3 --make-large /tmp/large
    python benchmarks/embed_throughput.py --datasets hymenoptera --repeats 1 --stages tutorial,auto
    python benchmarks/embed_throughput.py --precision fp32 --stages today,model,decode,auto  # no bf16 anywhere

Crash safety: scratch files in a temporary folder; the result JSON is written at the end (earlier
results in it are kept under ``earlier``, each with the CPU it came from).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
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
TODAY = "928da25"  # the last commit before issue 19: eager torch, Pillow decoding
MODELS = ("torch-fp32", "torch-bf16", "onnxruntime", "openvino", "openvino-bf16")  # *-bf16: CPUs with bf16


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


def cpu() -> dict:
    """The CPU as lscpu names it, and the flags that decide the runtime."""
    out = {"model": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        out["model"] = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("Flags"))
        out["flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return out


def file_list(folder: Path, limit: int | None) -> list[str]:
    from embedstore.data import discover

    _, items = discover(folder)
    items = items[:: max(1, len(items) // limit)][:limit] if limit else items
    return [it.path for it in items]


def make_large(src: Path, dst: Path, n: int = 200, side: int = 3000) -> Path:
    """Hymenoptera photos upscaled (LANCZOS) to ``side`` px on the long side, JPEG q90: big files to decode."""
    from PIL import Image

    photos = sorted(p for p in src.rglob("*.jpg"))[:: max(1, len(list(src.rglob("*.jpg"))) // n)][:n]
    for p in photos:
        out = dst / p.parent.name / p.name
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            im = im.convert("RGB")
            scale = side / max(im.size)
            im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS).save(out, quality=90)
    return dst


# --------------------------------------------------------------------------- stages (one process each)


def stage_tutorial(files: list[str], backbone: str, out: str, option: str) -> dict:
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


def stage_embed(files: list[str], backbone: str, out: str, option: str) -> dict:
    """``embedstore.embed`` with its defaults, from whatever code is first on sys.path (today's or now)."""
    import embedstore

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "files.csv"
        listing.write_text("\n".join(files))
        device = os.environ.get("EMBEDSTORE_BENCH_DEVICE", "auto")
        precision = os.environ.get("EMBEDSTORE_BENCH_PRECISION", "auto")
        summary = embedstore.embed(listing, Path(tmp) / "bench.h5", backbone=backbone, progress=False, device=device,
                                   precision=precision)
        sp = embedstore.open_store(Path(tmp) / "bench.h5").space()
        order = {p: i for i, p in enumerate(sp.paths)}
        np.save(out, sp.vectors[[order[f] for f in files]].astype(np.float32))
    return {"images": summary["embedded"], "seconds": summary["stages"]["embed"], "wall": summary["seconds"],
            "precision": summary["precision"], "runtime": summary.get("runtime", "torch (before runtimes)"),
            "notes": summary.get("notes", []), "code": str(Path(embedstore.__file__).parent)}


def stage_model(files: list[str], backbone: str, out: str, option: str) -> dict:
    """One runtime alone on 64 of the set's images, decoded beforehand by the reference path."""
    import torch
    from PIL import Image

    from embedstore import load_backbone
    from embedstore.embedding.embedder import Embedder

    bb = load_backbone(backbone)
    transform = bb.eval_transform()
    batch = torch.stack([torch.as_tensor(np.asarray(transform(Image.open(f).convert("RGB")))) for f in files[:64]])
    if option.startswith("torch-"):
        emb = Embedder(bb, device=os.environ.get("EMBEDSTORE_BENCH_DEVICE", "cpu"), precision=option.split("-")[1])
    else:
        from embedstore.embedding.onnx import SessionEmbedder
        from embedstore.embedding.runtimes import validate

        runtime, _, precision = option.partition("-")
        emb = SessionEmbedder(bb, runtime, precision=precision or "fp32")
        validate(emb, batch[:8])
    vectors = emb(batch)  # warm-up (the embedder returns numpy: a GPU run is synchronised by the copy)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        emb(batch)
        times.append(time.perf_counter() - t0)
    np.save(out, vectors)
    return {"images": len(batch), "seconds": statistics.median(times), "runtime": getattr(emb, "runtime", option)}


def stage_decode(files: list[str], backbone: str, out: str, option: str) -> dict:
    """The reader's work per image on one core (what a decode worker does), over every file."""
    import torch

    from embedstore import load_backbone
    from embedstore.data.collection import ImageItem
    from embedstore.data.reader import ImageReader, collate, draft_size

    torch.set_num_threads(1)
    bb = load_backbone(backbone)
    reader = ImageReader([ImageItem(f, f) for f in files], bb.eval_transform(), draft_size(bb.data_config))
    t0 = time.perf_counter()
    for start in range(0, len(files), 64):  # batches collated as the DataLoader's workers do
        collate([reader[i] for i in range(start, min(start + 64, len(files)))])
    return {"images": len(files), "seconds": time.perf_counter() - t0}


STAGES = {"tutorial": stage_tutorial, "today": stage_embed, "model": stage_model, "decode": stage_decode,
          "auto": stage_embed}


def run_stage(stage: str, files_json: str, backbone: str, out: str, option: str = "",
              code: Path | None = None) -> dict:
    env = dict(os.environ)
    if code is not None:  # today's code first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--stage", stage, "--files", files_json, "--backbone", backbone, "--out", out,
         "--option", option], capture_output=True, text=True, check=False, env=env,
        cwd=str(code) if code is not None else None)
    if proc.returncode:
        raise RuntimeError(f"stage {stage} {option} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def today_worktree(rev: str, where: Path) -> Path:
    """A detached worktree of ``rev`` with ``embedstore_cli`` beside ``embedstore`` (as the install names it)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    (where / "embedstore_cli").symlink_to(where / "cli")
    return where


def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    from embedstore._vectors import median_cosine

    return round(float(median_cosine(a, b)), 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding the data sets")
    ap.add_argument("--datasets", default="imagenette,hymenoptera")
    ap.add_argument("--large", type=Path, help="a folder of large photos, measured as the set 'large'")
    ap.add_argument("--make-large", type=Path, help="write upscaled hymenoptera photos here first (and use them)")
    ap.add_argument("--limit", type=int, default=None, help="use at most this many files per set (evenly spaced)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", default="tutorial,today,model,decode,auto")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the model stages and `embed` run")
    ap.add_argument("--precision", default="auto", help="`embed`'s --precision for today and auto (fp32: the path "
                    "a CPU without bf16 takes)")
    ap.add_argument("--today", default=TODAY, help="git revision of 'today' (the path before this change)")
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "embed_throughput.json")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--option", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.stage:
        files = json.loads(Path(args.files).read_text())
        result = STAGES[args.stage](files, args.backbone, args.out, args.option)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    from embedstore.embedding.embedder import cpu_has_bf16

    stages = args.stages.split(",")
    os.environ["EMBEDSTORE_BENCH_DEVICE"] = args.device
    os.environ["EMBEDSTORE_BENCH_PRECISION"] = args.precision
    if args.device == "cpu":
        models = [m for m in MODELS if not m.endswith("-bf16") or cpu_has_bf16() and args.precision != "fp32"]
    else:  # the exported runtimes run on the CPU: on a GPU the model stages are torch's precisions
        models = ["torch-fp32", "torch-fp16", "torch-bf16"]
    sets = {name: args.data / SETS[name] for name in args.datasets.split(",") if name}
    if args.make_large:
        sets["large"] = make_large(args.data / "hymenoptera", args.make_large)
    elif args.large:
        sets["large"] = args.large
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        # a fresh runtime cache: the first auto run of the first set pays the export, validation and probe
        # (reported as auto_first_run_wall_s), as on a new machine; later runs reuse them, as a user's do
        os.environ.setdefault("EMBEDSTORE_CACHE", str(Path(scratch) / "cache"))
        code = today_worktree(args.today, Path(scratch) / "today") if "today" in stages else None
        try:
            for name, folder in sets.items():
                if not folder.is_dir():
                    print(f"skip {name}: {folder} is absent", file=sys.stderr)
                    continue
                rows.append(measure_set(name, folder, args, stages, models, code, Path(scratch)))
        finally:
            if code is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code)], check=False)
    report(rows, args)


def measure_set(name: str, folder: Path, args: argparse.Namespace, stages: list[str], models: list[str],
                code: Path | None, scratch: Path) -> dict:
    files = file_list(folder, args.limit)
    tmp = scratch / name
    tmp.mkdir()
    files_json = tmp / "files.json"
    files_json.write_text(json.dumps(files))
    plan = [(s, "") for s in stages if s != "model"] + ([("model", m) for m in models] if "model" in stages else [])
    runs: dict[str, list[dict]] = {f"{s}:{o}" if o else s: [] for s, o in plan}
    for r in range(args.repeats):
        for stage, option in plan:  # interleaved
            key = f"{stage}:{option}" if option else stage
            runs[key].append(run_stage(stage, str(files_json), args.backbone, str(tmp / f"{key}.npy"), option,
                                       code if stage == "today" else None))
            print(f"{name} repeat {r + 1} {key}: {runs[key][-1]}", file=sys.stderr, flush=True)
    ips = {k: round(statistics.median(x["images"] / x["seconds"] for x in v), 1) for k, v in runs.items()}
    row: dict = {"dataset": name, "images": len(files), "img_per_s": ips,
                 "peak_rss_mb": {k: max(x["peak_rss_mb"] for x in v) for k, v in runs.items()},
                 "repeats": args.repeats}
    if "auto" in runs:
        row["auto_runtime"] = runs["auto"][-1]["runtime"]
        row["auto_notes"] = runs["auto"][-1]["notes"]
        row["auto_first_run_wall_s"] = round(runs["auto"][0]["wall"], 1)
        row["auto_wall_s"] = round(statistics.median(x["wall"] for x in runs["auto"]), 1)
    model_keys = [k for k in ips if k.startswith("model:")]
    ratios = {}
    if "auto" in ips:
        if "today" in ips:
            ratios["auto_over_today"] = round(ips["auto"] / ips["today"], 2)
        if "tutorial" in ips:
            ratios["auto_over_tutorial"] = round(ips["auto"] / ips["tutorial"], 2)
        if model_keys:
            best = max(model_keys, key=ips.get)
            ratios["auto_over_best_model"] = round(ips["auto"] / ips[best], 2)
            ratios["best_model"] = best.split(":", 1)[1]
            if "decode" in ips:  # the most a pipeline can reach: each image's decode and model core time
                cores = len(os.sched_getaffinity(0))
                bound = cores / (cores / ips[best] + 1 / ips["decode"])
                ratios["bound_over_best_model"] = round(bound / ips[best], 2)
                ratios["auto_over_bound"] = round(ips["auto"] / bound, 2)
    row["ratios"] = ratios
    cos = {}
    ref = tmp / "tutorial.npy"
    for k in ("today", "auto"):
        if ref.exists() and (tmp / f"{k}.npy").exists():
            cos[f"{k}_vs_tutorial_fp32"] = cosine_rows(np.load(ref), np.load(tmp / f"{k}.npy"))
    fp32 = tmp / "model:torch-fp32.npy"
    for k in model_keys:
        if fp32.exists():
            from embedstore._vectors import cosines

            low = cosines(np.load(fp32), np.load(tmp / f"{k}.npy")).min()
            cos[f"{k.split(':', 1)[1]}_vs_torch_fp32_min"] = round(float(low), 6)
    row["cosine"] = cos
    return row


def report(rows: list[dict], args: argparse.Namespace) -> None:
    import embedstore

    keys = sorted({k for r in rows for k in r["img_per_s"]}, key=lambda k: ("tutorial", "today", "auto").index(k)
                  if k in ("tutorial", "today", "auto") else 3)
    header = ["set", "images", *keys, "auto/today", "auto/best model", "bound/best model", "auto/tutorial",
              "auto runtime"]
    table = [[r["dataset"], r["images"], *[r["img_per_s"].get(k, "") for k in keys],
              r["ratios"].get("auto_over_today", ""), r["ratios"].get("auto_over_best_model", ""),
              r["ratios"].get("bound_over_best_model", ""), r["ratios"].get("auto_over_tutorial", ""),
              r.get("auto_runtime", "")] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for line in [header, ["-" * w for w in widths], *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    previous = json.loads(args.json_out.read_text()) if args.json_out.exists() else {}
    earlier = previous.get("earlier", [])
    if "results" in previous:  # the previous run, with its machine, commit and options
        earlier.append({k: v for k, v in previous.items() if k != "earlier"})
    machine = {"cpu": cpu(), "platform": platform.platform(), "embedstore": embedstore.__version__,
               "load_avg_start": [round(x, 2) for x in os.getloadavg()]}
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"machine": machine, "git_head": git.stdout.strip(), "today": args.today,
                                         "precision": args.precision,
                                         "results": rows, "earlier": earlier}, indent=2) + "\n")
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
