"""Search benchmark: embedstore's index kinds side by side with exact baselines.

    python benchmarks/search.py                      # 1M x 512 synthetic clustered vectors
    python benchmarks/search.py --rows 200000        # smaller
    python benchmarks/search.py --store photos.h5    # a real store's vectors (held-out rows as queries)

For each method: build seconds (tuning included, as ``embedstore index`` pays it), peak RSS of the
process that built it, recall@10 against exact search on held-out queries the tuner never saw,
p50/p99 latency of single queries on one thread (medians over repeated queries), and batch QPS.
Every method runs in its own process, which reads the vectors from disk in chunks, so its peak
RSS is what that method needs. Writes a table to stdout and JSON to benchmarks/results/search.json.

The synthetic vectors imitate image embeddings: clusters (about 1000 vectors each) around centres
that share a common direction, each spread along its own 64 directions with decaying scales, plus
isotropic noise. The parameters were set so that 1000 vectors in 10 clusters match a real store
(1000 imagenette images, efficientnet_lite0 features): cosine to the 1st / 10th neighbour
0.63 / 0.57 (real: 0.67 / 0.57), to the class mean 0.70 (0.69), participation ratio of the
spectrum 62 (69). At 1M rows these clusters are well separated, which suits inverted lists;
``--hard`` draws overlapping clusters that all spread along the same 48 directions instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from embedstore.index import exact_knn, index_vectors, normalized, omp_threads, recall_at_k
from embedstore.utils import parse_size

KINDS = ["auto", "hnsw", "ivf-flat", "ivf-pq", "ivf-pq-refine", "flat"]
DEFAULT_METHODS = ["auto", "hnsw", "ivf-flat", "ivf-pq", "faiss-IndexFlatIP", "sklearn-brute"]
BASELINES = ["faiss-IndexFlatIP", "sklearn-brute"]
RESULTS = Path(__file__).resolve().parent / "results" / "search.json"
GEN = dict(rank=64, spread=1.1, noise=0.8, shared=0.8, decay=0.4, one_subspace=False)  # see the module docstring
# --hard: overlapping clusters that all spread along the same 48 directions: neighbours then lie
# in other clusters' inverted lists too, and IVF must probe far more of them.
HARD = dict(rank=48, spread=1.9, noise=0.25, shared=0.0, decay=0.5, one_subspace=True)


# --------------------------------------------------------------------------- data


class NpyRows:
    """Rows of a 2-D .npy file, read with plain reads (no memory map): a process's resident
    memory then holds only what it keeps. Supports ``[a:b]`` and sorted integer arrays."""

    def __init__(self, path: str | os.PathLike, limit: int | None = None) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
            self.offset = f.tell()
        self.fd = os.open(path, os.O_RDONLY)
        self.dtype = np.dtype(dtype)
        self.shape = (min(shape[0], limit or shape[0]), shape[1])
        self.row_bytes = self.dtype.itemsize * shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, a: int, b: int) -> np.ndarray:
        raw = os.pread(self.fd, (b - a) * self.row_bytes, self.offset + a * self.row_bytes)
        return np.frombuffer(raw, self.dtype).reshape(b - a, self.shape[1])

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            a, b, _ = key.indices(self.shape[0])
            return self._read(a, b)
        out = np.empty((len(key), self.shape[1]), self.dtype)
        for j, i in enumerate(np.asarray(key)):
            out[j] = self._read(int(i), int(i) + 1)[0]
        return out


def synthetic(path: Path, n: int, dim: int, clusters: int, gen: dict[str, Any], seed: int = 0, start_key: int = 0,
              chunk: int = 65536) -> None:
    """Write n clustered vectors to a .npy file, chunk by chunk (see the module docstring).

    The same seed and cluster count give the same clusters; ``start_key`` draws other members.
    """
    rng = np.random.default_rng(seed)
    k = clusters
    mean = rng.standard_normal(dim).astype(np.float32)
    centers = rng.standard_normal((k, dim), dtype=np.float32)
    centers = centers / np.linalg.norm(centers, axis=1, keepdims=True) + gen["shared"] * mean / np.linalg.norm(mean)
    r = gen["rank"]
    bases = rng.standard_normal((1 if gen["one_subspace"] else k, r, dim), dtype=np.float32) / np.sqrt(dim)
    scale = np.arange(1, r + 1, dtype=np.float32) ** -gen["decay"]
    scale *= gen["spread"] / np.sqrt((scale**2).sum())
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        g = np.random.default_rng((seed, start_key, a))
        lab = g.integers(0, k, b - a)
        x = centers[lab] + g.standard_normal((b - a, dim), dtype=np.float32) * (gen["noise"] / np.sqrt(dim))
        z = g.standard_normal((b - a, r), dtype=np.float32) * scale
        order = np.argsort(lab, kind="stable")
        cuts = np.flatnonzero(np.diff(lab[order])) + 1
        for run in np.split(order, cuts):
            x[run] += z[run] @ bases[0 if gen["one_subspace"] else lab[run[0]]]
        out[a:b] = x
    out.flush()
    del out


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write base.npy, queries.npy and the exact top-10 of every query (full set and HNSW subset)."""
    t0 = time.perf_counter()
    if args.store:
        import embedstore

        sp = embedstore.open_store(args.store).space(args.space)
        held = np.sort(np.random.default_rng(0).choice(len(sp), min(args.queries, len(sp) // 10), replace=False))
        keep = np.setdiff1d(np.arange(len(sp)), held)
        np.save(work / "base.npy", sp.vectors[keep].astype(np.float32))
        np.save(work / "queries.npy", normalized(sp.vectors, held))
        data = {"source": f"store {args.store}, space {sp.name} ({sp.attrs.get('backbone')})",
                "rows": int(len(keep)), "dim": sp.dim}
    else:
        clusters = max(10, min(4000, args.rows // 1000))
        gen = HARD if args.hard else GEN
        synthetic(work / "base.npy", args.rows, args.dim, clusters, gen)
        synthetic(work / "queries.npy", args.queries, args.dim, clusters, gen, start_key=1)  # unseen members
        q = np.load(work / "queries.npy")
        np.save(work / "queries.npy", normalized(q))
        data = {"source": f"synthetic clustered vectors{' (--hard)' if args.hard else ''}",
                "generator": {**gen, "clusters": clusters}, "rows": args.rows, "dim": args.dim}
    base = NpyRows(work / "base.npy")
    queries = np.load(work / "queries.npy")
    ids = np.arange(len(base))
    scores, truth = exact_knn(queries, base, ids, 10)
    np.save(work / "truth.npy", truth)
    if args.hnsw_rows < len(base):
        subset = NpyRows(work / "base.npy", args.hnsw_rows)
        np.save(work / "truth_hnsw.npy", exact_knn(queries, subset, ids[: len(subset)], 10)[1])
    data.update(queries=len(queries), prepare_seconds=round(time.perf_counter() - t0, 1),
                cosine_1st_neighbour=round(float(np.median(scores[:, 0])), 3),
                cosine_10th_neighbour=round(float(np.median(scores[:, 9])), 3))
    return data


# --------------------------------------------------------------------------- one method


def peak_rss() -> int:
    """Peak resident memory of this process image (VmHWM: unlike ru_maxrss, not inherited
    across fork + exec from the parent that launched it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def single_latency(search_one: Callable[[np.ndarray], Any], queries: np.ndarray, budget_s: float = 20.0,
                   max_repeats: int = 2000) -> tuple[float, float, int]:
    """p50 / p99 (ms) of one-query searches repeated over the queries, within a time budget."""
    for q in queries[:5]:
        search_one(q[None])
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_repeats and (time.perf_counter() < t_end or len(times) < 20):
        q = queries[len(times) % len(queries)][None]
        t0 = time.perf_counter()
        search_one(q)
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3), len(times)


def run_method(method: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build one method, then measure it; runs inside its own process."""
    limit = args.hnsw_rows if method == "hnsw" else None
    base = NpyRows(work / "base.npy", limit)
    queries = np.load(work / "queries.npy")
    truth = np.load(work / ("truth_hnsw.npy" if limit and limit < NpyRows(work / "base.npy").shape[0] else "truth.npy"))
    out: dict[str, Any] = {"method": method, "rows": len(base)}
    t0 = time.perf_counter()
    if method in KINDS:
        built = index_vectors(base, kind=method, memory=parse_size(args.memory), target_recall=args.target_recall)
        index = built.index
        out.update(index=built.factory, params=built.tuning.params, tuned_recall=round(built.tuning.recall, 4),
                   stages={k: round(v, 1) for k, v in built.stages.items()}, notes=built.notes)
        search: Callable[[np.ndarray, int], np.ndarray] = lambda q, k: index.search(q, k)[1]  # noqa: E731
    elif method == "faiss-IndexFlatIP":
        index = faiss.IndexFlatIP(base.shape[1])
        for a in range(0, len(base), 65536):
            index.add(normalized(base, slice(a, a + 65536)))
        out["index"] = "IndexFlatIP"
        search = lambda q, k: index.search(q, k)[1]  # noqa: E731
    elif method == "sklearn-brute":
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=10, algorithm="brute", metric="cosine").fit(base[0 : len(base)])
        out["index"] = "NearestNeighbors(brute, cosine)"
        search = lambda q, k: nn.kneighbors(q, k, return_distance=False)  # noqa: E731
    else:
        raise SystemExit(f"unknown method {method}")
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    out["recall_at_10"] = round(recall_at_k(search(queries, 10), truth), 4)
    with omp_threads(1):
        p50, p99, reps = single_latency(lambda q: search(q, 10), queries)
    t1 = time.perf_counter()
    search(queries, 10)
    out.update(p50_ms=round(p50, 3), p99_ms=round(p99, 3), latency_repeats=reps,
               batch_qps=round(len(queries) / (time.perf_counter() - t1), 1), peak_rss_bytes=peak_rss())
    return out


# --------------------------------------------------------------------------- driver


def machine() -> dict[str, Any]:
    import sklearn

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "load_average": os.getloadavg(),
            "python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
            "sklearn": sklearn.__version__, "faiss_threads": faiss.omp_get_max_threads()}


def table(results: list[dict[str, Any]]) -> str:
    head = ["method", "index", "rows", "build s", "peak RSS", "recall@10", "p50 ms", "p99 ms", "batch QPS", "params"]
    rows = [[r["method"], r.get("index", ""), f"{r['rows']:,}", r.get("build_seconds", ""),
             f"{r['peak_rss_bytes'] / 2**30:.2f}G" if "peak_rss_bytes" in r else "",
             r.get("recall_at_10", r.get("error", "")), r.get("p50_ms", ""), r.get("p99_ms", ""),
             r.get("batch_qps", ""), ",".join(f"{k}={v}" for k, v in r.get("params", {}).items())] for r in results]
    cells = [head] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--store", help="benchmark a real store's vectors instead of synthetic ones")
    p.add_argument("--hard", action="store_true", help="overlapping clusters sharing one subspace (harder for IVF)")
    p.add_argument("--space")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(KINDS + BASELINES)} (flat = IndexFlatIP behind an id map)")
    p.add_argument("--memory", default="4G")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--hnsw-rows", type=int, default=100_000,
                   help="HNSW builds on at most this many rows (15+ minutes for 1M on two cores)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--workdir", help="keep the data files here and reuse them on the next run with the same "
                   "--rows/--dim/--queries/--store (default: a temporary folder)")
    p.add_argument("--merge", action="store_true", help="replace only these methods' rows in an existing --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_method(args.worker, Path(args.workdir), args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="embedstore-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {"machine": machine(), "targets": {"build_seconds": 600, "peak_rss_bytes": 4 << 30,
                                                                     "recall_at_10": 0.95, "p50_ms": 2.0}}
        key = {k: getattr(args, k) for k in ("rows", "dim", "queries", "store", "space", "hnsw_rows", "hard")}
        saved = work / "data.json"
        if args.workdir and saved.exists() and json.loads(saved.read_text()).get("key") == key:
            print(f"reusing the data in {work}", file=sys.stderr, flush=True)
            report["data"] = json.loads(saved.read_text())["data"]
        else:
            print(f"preparing data in {work} ...", file=sys.stderr, flush=True)
            report["data"] = prepare(args, work)
            saved.write_text(json.dumps({"key": key, "data": report["data"]}))
        print(json.dumps(report["data"]), file=sys.stderr, flush=True)
        results = []
        for method in args.methods.split(","):
            print(f"running {method} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--worker", method, "--workdir", str(work), "--memory", args.memory,
                   "--target-recall", str(args.target_recall), "--hnsw-rows", str(args.hnsw_rows)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"method": method, "rows": 0,
                                                     "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
        if args.merge and Path(args.out).exists():  # keep the other methods of an earlier run
            earlier = json.loads(Path(args.out).read_text())
            if earlier.get("data", {}).get("rows") == report["data"]["rows"]:
                done = {r["method"] for r in results}
                results = [r for r in earlier["results"] if r["method"] not in done] + results
                order = {m: i for i, m in enumerate(KINDS + BASELINES)}
                results.sort(key=lambda r: order.get(r["method"], len(order)))
                report["merged_runs"] = earlier.get("merged_runs", [earlier["machine"]]) + [report["machine"]]
        report["results"] = results
        auto = next((r for r in results if r["method"] == "auto" and "error" not in r), None)
        if auto:
            t = report["targets"]
            report["auto_meets_targets"] = {
                "build_seconds": auto["build_seconds"] <= t["build_seconds"],
                "peak_rss": auto["peak_rss_bytes"] <= t["peak_rss_bytes"],
                "recall_at_10": auto["recall_at_10"] >= t["recall_at_10"],
                "p50_ms": auto["p50_ms"] <= t["p50_ms"]}
        report["machine"]["load_average_end"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(table(results))
        print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
