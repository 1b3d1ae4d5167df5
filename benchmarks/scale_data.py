"""Synthetic stores for ``benchmarks/scale.py``: clustered 512-d vectors in clip-retrieval's layout, then a store.

The data is written part by part (``--part-rows`` rows each, default 100,000), so memory stays at one
part whatever N is, in the layout clip-retrieval's inference writes::

    DIR/img_emb/img_emb_<i>.npy            float16 (rows, dim)
    DIR/metadata/metadata_<i>.parquet      image_path, label, split (null = none)

Vectors are clustered (``CLUSTERS`` clusters spread over ``CLASSES`` classes, each vector its cluster's
centre plus noise in a low-dimensional subspace plus a little isotropic noise), so nearest neighbours
and recall mean something. ``LABELLED`` rows spread evenly over the store carry their cluster's class
as label and a train/val split (1 in 5 val); the other rows have neither.

The store is then written from those files (the timed "write" step, run in its own process by
scale.py): with ``embedstore.pipeline.importer.import_vectors`` when that module exists, else with
``StoreWriter.commit_arrays`` one part per commit. ``halves`` makes two folders of symlinks (first
and second half of the parts) for the merge measurement.

Crash safety: none needed, this is scratch data; a killed run leaves files the next run overwrites.

    python benchmarks/scale_data.py layout DIR --rows 1000000
    python benchmarks/scale_data.py write DIR STORE.h5 --root ROOT
    python benchmarks/scale_data.py direct STORE.h5 --rows 30M --root ROOT   # no layout: when disk is short
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

DIM = 512
CLASSES = 10
CLUSTERS = 2000
LATENT = 24
LABELLED = 10_000
SPACE = "synthetic"
SEED = 17


def parse_size(text: str) -> int:
    """'1M' -> 1_000_000, '250k' -> 250_000, '30000' -> 30000."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def size_name(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % (div // 10 or 1) == 0:
            return f"{n / div:g}{unit}"
    return str(n)


def labelled_rows(n: int) -> np.ndarray:
    """The rows that carry a label (and a split): ``LABELLED`` of them spread evenly (all when n is smaller)."""
    m = min(n, LABELLED)
    return np.unique(np.linspace(0, n - 1, m).astype(np.int64))


def is_val(rows: np.ndarray, n: int) -> np.ndarray:
    """Which labelled rows are in the val split (every fifth labelled row)."""
    return (np.searchsorted(labelled_rows(n), rows) % 5) == 4


def _model(seed: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = rng.standard_normal((CLASSES, dim)).astype(np.float32)
    centres = classes[np.arange(CLUSTERS) % CLASSES] * 0.5 + rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    basis = rng.standard_normal((LATENT, dim)).astype(np.float32) / np.sqrt(LATENT)
    return centres, basis, classes


def part(i: int, start: int, stop: int, n: int, seed: int = SEED, dim: int = DIM,
         model: tuple | None = None) -> dict[str, Any]:
    """Rows [start, stop) of the synthetic collection of n rows: vectors float16, paths, labels, splits."""
    centres, basis, _ = model or _model(seed, dim)
    rng = np.random.default_rng([seed, i])
    rows = np.arange(start, stop, dtype=np.int64)
    cluster = rng.integers(0, CLUSTERS, len(rows))
    x = centres[cluster]
    x += 0.9 * (rng.standard_normal((len(rows), LATENT), dtype=np.float32) @ basis)
    x += 0.25 * rng.standard_normal((len(rows), dim), dtype=np.float32)
    lab = labelled_rows(n)
    mask = np.isin(rows, lab)
    labels = np.full(len(rows), None, dtype=object)
    splits = np.full(len(rows), None, dtype=object)
    labels[mask] = [f"class{c}" for c in cluster[mask] % CLASSES]
    splits[mask] = np.where(is_val(rows[mask], n), "val", "train")
    return {"vectors": x.astype(np.float16), "paths": [f"img/{r:09d}.jpg" for r in rows],
            "labels": labels, "splits": splits}


def write_layout(folder: Path, n: int, part_rows: int = 100_000, seed: int = SEED) -> dict[str, Any]:
    """Write the clip-retrieval layout of n rows under ``folder``; returns its description."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    model = _model(seed, DIM)
    parts = 0
    for i, start in enumerate(range(0, n, part_rows)):
        p = part(i, start, min(n, start + part_rows), n, seed, DIM, model)
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", p["vectors"])
        table = pa.table({"image_path": p["paths"], "label": pa.array(list(p["labels"]), pa.string()),
                          "split": pa.array(list(p["splits"]), pa.string())})
        pq.write_table(table, folder / "metadata" / f"metadata_{i}.parquet")
        parts += 1
    info = {"rows": n, "parts": parts, "part_rows": part_rows, "dim": DIM, "seed": seed, "clusters": CLUSTERS,
            "classes": CLASSES, "labelled": int(len(labelled_rows(n)))}
    (folder / "layout.json").write_text(json.dumps(info))
    return info


def halves(folder: Path, out_a: Path, out_b: Path) -> tuple[int, int]:
    """Two layouts of symlinks to the first and the second half of ``folder``'s parts; their row counts."""
    info = json.loads((folder / "layout.json").read_text())
    cut = (info["parts"] + 1) // 2
    counts = []
    for out, ids in ((out_a, range(cut)), (out_b, range(cut, info["parts"]))):
        rows = 0
        for sub in ("img_emb", "metadata"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(ids):
            for sub, name, ext in (("img_emb", "img_emb", "npy"), ("metadata", "metadata", "parquet")):
                link = out / sub / f"{name}_{j}.{ext}"
                link.unlink(missing_ok=True)
                link.symlink_to((folder / sub / f"{name}_{i}.{ext}").resolve())
            rows += len(np.load(folder / "img_emb" / f"img_emb_{i}.npy", mmap_mode="r"))
        (out / "layout.json").write_text(json.dumps(dict(info, rows=rows, parts=len(ids))))
        counts.append(rows)
    return counts[0], counts[1]


def iter_parts(folder: Path) -> Iterator[tuple[np.ndarray, list, list, list]]:
    """(vectors, image_path, label, split) of each part, in order."""
    import pyarrow.parquet as pq

    info = json.loads((folder / "layout.json").read_text())
    for i in range(info["parts"]):
        meta = pq.read_table(folder / "metadata" / f"metadata_{i}.parquet")
        yield (np.load(folder / "img_emb" / f"img_emb_{i}.npy"), meta["image_path"].to_pylist(),
               meta["label"].to_pylist(), meta["split"].to_pylist())


def importer() -> Any:
    """``embedstore.pipeline.importer.import_vectors`` when that module exists, else None."""
    try:
        found = importlib.util.find_spec("embedstore.pipeline.importer")
    except ImportError:
        found = None
    if found is None:
        return None
    module = importlib.import_module("embedstore.pipeline.importer")
    return getattr(module, "import_vectors", None)


def write_store(folder: Path, store: Path, root: Path, space: str = SPACE) -> dict[str, Any]:
    """Write ``store`` from the layout in ``folder`` (import_vectors if present, else commit_arrays)."""
    fn = importer()
    t0 = time.perf_counter()
    if fn is not None:
        params = inspect.signature(fn).parameters
        kw: dict[str, Any] = {}
        if "space" in params:
            kw["space"] = space
        if "root" in params:
            kw["root"] = str(root)
        out = fn(store, folder, **kw)
        return {"method": "import_vectors", "seconds": time.perf_counter() - t0,
                "summary": out if isinstance(out, dict) else None}
    from embedstore.store import StoreWriter

    attrs = {"dim": DIM, "dtype": "float16", "backbone": "synthetic", "weights_sha256": None,
             "imported_from": str(folder)}
    method = "commit_arrays" if hasattr(StoreWriter, "commit_arrays") else "commit"
    with StoreWriter(store, root=str(root)) as w:
        for vectors, paths, labels, splits in iter_parts(folder):
            if method == "commit_arrays":
                w.commit_arrays(space, attrs, vectors, paths, labels=labels, splits=splits)
            else:  # code older than commit_arrays (the "before" checkout): one Batch per part
                from embedstore.store import Batch

                n = len(paths)
                images = {"path": paths, "label": [v or "" for v in labels], "split": [v or "" for v in splits],
                          "size": [0] * n, "hash": [""] * n, "mtime": [0.0] * n}
                w.commit(Batch(images=images, vectors=list(vectors)), space, attrs)
    return {"method": method, "seconds": time.perf_counter() - t0}


def write_direct(store: Path, n: int, root: Path, part_rows: int = 100_000, seed: int = SEED) -> dict[str, Any]:
    """The rows ``write_layout`` + ``write_store`` would give, generated in memory and committed part by
    part through one ``StoreWriter`` (``commit_arrays``, what ``add_vectors`` does), folded once at the
    end: for a size whose layout, journal and folded store do not fit on the disk together."""
    from embedstore.pipeline.importer import ARRAYS_FORMAT, lineage
    from embedstore.store import StoreWriter

    t0 = time.perf_counter()
    attrs = lineage(DIM, "float16", ARRAYS_FORMAT, f"benchmarks/scale_data.py seed {seed}")
    model = _model(seed, DIM)
    with StoreWriter(store, root=str(root)) as w:
        for i, start in enumerate(range(0, n, part_rows)):
            p = part(i, start, min(n, start + part_rows), n, seed, DIM, model)
            w.commit_arrays(SPACE, attrs, p["vectors"], p["paths"], labels=list(p["labels"]), splits=list(p["splits"]))
    return {"method": "commit_arrays (generated in memory, no layout)", "rows": n, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lay = sub.add_parser("layout", help="Write the clip-retrieval layout of --rows synthetic vectors.")
    lay.add_argument("folder", type=Path)
    lay.add_argument("--rows", type=parse_size, required=True)
    lay.add_argument("--part-rows", type=int, default=100_000)
    wr = sub.add_parser("write", help="Write a store from a layout (import_vectors, else commit_arrays).")
    wr.add_argument("folder", type=Path)
    wr.add_argument("store", type=Path)
    wr.add_argument("--root", type=Path, required=True)
    direct = sub.add_parser("direct", help="Write a store of --rows synthetic vectors without a layout on disk.")
    direct.add_argument("store", type=Path)
    direct.add_argument("--rows", type=parse_size, required=True)
    direct.add_argument("--root", type=Path, required=True)
    direct.add_argument("--part-rows", type=int, default=100_000)
    args = ap.parse_args(argv)
    if args.cmd == "layout":
        print(json.dumps(write_layout(args.folder, args.rows, args.part_rows)))
    elif args.cmd == "direct":
        print(json.dumps(write_direct(args.store, args.rows, args.root, args.part_rows)))
    else:
        print(json.dumps(write_store(args.folder, args.store, args.root)))


if __name__ == "__main__":
    sys.exit(main())
