"""Baselines of ``benchmarks/scale.py``: the minimal raw work of each command, on the same files, without embedstore.

Each runs as its own process (scale.py measures its wall time and peak RSS like the command's) and
prints one JSON object. They read the store's HDF5 layout directly with h5py (``images/<column>``,
``spaces/<name>/vectors`` and ``rows``) and the index through its sidecar with faiss, so the table
shows embedstore's overhead over the work itself:

    info        open the file, read the header: row count, space names, shapes and attributes
    write       h5py: create a resizable float16 dataset and append every part of the layout
    index       faiss index_factory with the factory embedstore chose: train on a sample, add in chunks
    search      read one row, faiss.read_index (memory-mapped where faiss can), set the sidecar's parameters,
                search k=10; with the sidecar's k_factor, re-rank k * k_factor candidates read from the store
    classify    read the labelled rows (label/split columns at those rows, their vectors), one
                LogisticRegression fit on train, scored on val
    merge       h5py: copy the two halves' datasets into one new file, chunk by chunk
    duplicates  k=10 self-search of every vector through the built index, in chunks (``--queries Q``: the
                first Q rows only; scale.py then scales the search time up to all rows)

Crash safety: read-only on the store and index; writes only their own scratch outputs.

    python benchmarks/scale_raw.py search STORE.h5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 65_536


def _space(f: Any) -> Any:
    return f["spaces"][next(iter(f["spaces"]))]


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def info(store: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(store, "r") as f:
        out = {"images": int(f["images"]["path"].shape[0]),
               "spaces": {name: {"shape": list(g["vectors"].shape), "attrs": {k: str(v) for k, v in g.attrs.items()}}
                          for name, g in f["spaces"].items()}}
    return out


def write(folder: Path, out: Path) -> dict[str, Any]:
    import h5py

    parts = json.loads((folder / "layout.json").read_text())["parts"]
    with h5py.File(out, "w") as f:
        ds = None
        for i in range(parts):
            v = np.load(folder / "img_emb" / f"img_emb_{i}.npy")
            if ds is None:
                ds = f.create_dataset("vectors", shape=(0, v.shape[1]), maxshape=(None, v.shape[1]), dtype=v.dtype,
                                      chunks=(min(4096, len(v)), v.shape[1]))
            n = ds.shape[0]
            ds.resize(n + len(v), axis=0)
            ds[n:] = v
        rows = int(ds.shape[0]) if ds is not None else 0
    return {"rows": rows}


def _sidecar(store: Path) -> tuple[dict[str, Any], Path]:
    folder = Path(f"{store}.index")
    sidecar = sorted(folder.glob("*.json"))[0]
    info = json.loads(sidecar.read_text())
    beside = folder / f"{sidecar.stem}.{info.get('generation', 0)}.faiss"  # the store may have moved since
    return info, beside if beside.exists() else Path(info.get("index_file") or beside)


def _read_index(path: Path, params: dict[str, Any]) -> tuple[Any, int]:
    """The index memory-mapped where faiss can (as any careful user reads a large one), with the sidecar's
    faiss parameters set; and ``k_factor``, embedstore's own re-rank depth (0: none), which faiss does not know."""
    import faiss

    try:
        ix = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        ix = faiss.read_index(str(path))
    ps = faiss.ParameterSpace()
    for k, v in params.items():
        if k != "k_factor":
            ps.set_index_parameter(ix, k, v)
    return ix, int(params.get("k_factor", 0))


def _search(ix: Any, vec: Any, q: np.ndarray, k: int, k_factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``q``; with ``k_factor``, the k * k_factor candidates re-ranked exactly from ``vec`` (the
    synthetic stores hold every image in one space, so an index id, a store row, is also a position)."""
    if not k_factor:
        return ix.search(q, k)
    _, cand = ix.search(q, k * k_factor)
    rows = np.unique(cand[cand >= 0])
    x = _normalized(vec[rows])  # one sorted read for the whole batch of queries
    at = np.searchsorted(rows, np.maximum(cand, 0))
    s = np.einsum("qd,qcd->qc", q, x[at])
    s[cand < 0] = -np.inf
    top = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, top, 1), np.take_along_axis(cand, top, 1)


def index(store: Path, factory: str, out: Path) -> dict[str, Any]:
    import faiss
    import h5py

    with h5py.File(store, "r") as f:
        vec = _space(f)["vectors"]
        n, dim = vec.shape
        t0 = time.perf_counter()
        ix = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        blocks = np.linspace(0, max(0, n - 1000), max(1, min(n, 100_000) // 1000)).astype(np.int64)
        train = np.concatenate([vec[a:a + 1000] for a in np.unique(blocks)])  # 100 evenly spaced blocks
        ix.train(_normalized(train))
        del train
        t_train = time.perf_counter() - t0
        for a in range(0, n, CHUNK):
            ix.add(_normalized(vec[a:min(n, a + CHUNK)]))
    faiss.write_index(ix, str(out))
    return {"factory": factory, "rows": int(ix.ntotal), "train_s": round(t_train, 2), "bytes": out.stat().st_size}


def search(store: Path, row: int = 42) -> dict[str, Any]:
    import h5py

    info, path = _sidecar(store)
    ix, k_factor = _read_index(path, info.get("params") or {})
    with h5py.File(store, "r") as f:
        vec = _space(f)["vectors"]
        q = _normalized(vec[row:row + 1])
        t0 = time.perf_counter()
        d, i = _search(ix, vec, q, 10, k_factor)
    return {"hits": i[0].tolist(), "scores": [round(float(s), 4) for s in d[0]],
            "search_ms": round(1000 * (time.perf_counter() - t0), 3), "index_bytes": path.stat().st_size}


def classify(store: Path) -> dict[str, Any]:
    import h5py
    from sklearn.linear_model import LogisticRegression

    sys.path.insert(0, str(Path(__file__).parent))
    from scale_data import labelled_rows

    with h5py.File(store, "r") as f:
        n = f["images"]["path"].shape[0]
        rows = labelled_rows(n)  # the benchmark's generator knows which rows are labelled
        labels = _decoded(f["images"]["label"], rows)
        splits = _decoded(f["images"]["split"], rows)
        space = _space(f)
        pos = np.searchsorted(space["rows"][()], rows) if "rows" in space else rows
        x = _normalized(space["vectors"][np.sort(pos)])
    train, val = splits == "train", splits == "val"
    model = LogisticRegression(max_iter=1000).fit(x[train], labels[train])
    return {"rows": int(len(rows)), "train": int(train.sum()), "val": int(val.sum()),
            "accuracy": round(float(model.score(x[val], labels[val])), 4)}


def _decoded(column: Any, rows: np.ndarray) -> np.ndarray:
    """Strings of a column at ``rows``: format 2 stores int32 codes into the ``categories`` attribute (-1: none)."""
    values = column[rows]
    if "categories" not in column.attrs:
        return values.astype(str)
    names = np.array(json.loads(column.attrs["categories"]) + [""], dtype=object)
    return names[np.where(values < 0, len(names) - 1, values)].astype(str)


def merge(a: Path, b: Path, out: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(out, "w") as g:
        for src in (a, b):
            with h5py.File(src, "r") as f:
                for name in ("images/" + c for c in f["images"]) if "images" in f else ():
                    _append(g, name, f[name])
                sp = _space(f)
                for c in ("vectors", "rows"):
                    if c in sp:
                        _append(g, f"space/{c}", sp[c])
        rows = int(g["space/vectors"].shape[0])
    return {"rows": rows, "bytes": out.stat().st_size}


def _append(g: Any, name: str, src: Any) -> None:
    if name not in g:
        g.create_dataset(name, shape=(0,) + src.shape[1:], maxshape=(None,) + src.shape[1:], dtype=src.dtype,
                         chunks=(min(4096, max(1, len(src))),) + src.shape[1:])
    ds = g[name]
    n = ds.shape[0]
    ds.resize(n + len(src), axis=0)
    for a in range(0, len(src), CHUNK):
        ds[n + a:n + min(len(src), a + CHUNK)] = src[a:a + CHUNK]


def duplicates(store: Path, k: int = 10, queries: int | None = None) -> dict[str, Any]:
    """k-NN self-search of the first ``queries`` rows (all when None) through the built index."""
    import h5py

    t0 = time.perf_counter()
    info, path = _sidecar(store)
    ix, k_factor = _read_index(path, info.get("params") or {})
    load_s = time.perf_counter() - t0
    edges = 0
    with h5py.File(store, "r") as f:
        vec = _space(f)["vectors"]
        n = len(vec)
        q = n if queries is None else min(n, queries)
        t1 = time.perf_counter()
        step = 4096 if k_factor else CHUNK  # re-ranking holds k * k_factor candidate vectors per query
        for a in range(0, q, step):
            d, _ = _search(ix, vec, _normalized(vec[a:min(q, a + step)]), k, k_factor)
            edges += int((d[:, 1:] >= 0.825).sum())
        search_s = time.perf_counter() - t1
    return {"rows": int(n), "queries": int(q), "k": k, "edges_over_0.825": edges, "load_s": round(load_s, 3),
            "search_s": round(search_s, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op", choices=["info", "write", "index", "search", "classify", "merge", "duplicates"])
    ap.add_argument("paths", type=Path, nargs="+")
    ap.add_argument("--factory", default=None, help="index: the factory string to build.")
    ap.add_argument("--queries", type=int, default=None, help="duplicates: search only the first QUERIES rows.")
    a = ap.parse_args(argv)
    p = a.paths
    out = {"info": lambda: info(p[0]), "write": lambda: write(p[0], p[1]),
           "index": lambda: index(p[0], a.factory, p[1]), "search": lambda: search(p[0]),
           "classify": lambda: classify(p[0]), "merge": lambda: merge(p[0], p[1], p[2]),
           "duplicates": lambda: duplicates(p[0], queries=a.queries)}[a.op]()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
