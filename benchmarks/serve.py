"""Served search vs one ``embedstore search`` process, and the server under 1, 4 and 16 concurrent clients.

Side by side in one run, on the same stores and queries:

* **one query, cold process vs server**: the wall time of ``embedstore search STORE --row R --json``
  (a fresh process: imports, open the store, read the index, search) against one HTTP request to
  ``embedstore serve STORE`` (already running, warmed up), and against ``embedstore search --server``
  (a fresh client process). Medians; the ratio is process / request.
* **load**: N client threads on loopback, each sending queries back to back for ``--seconds``
  (bounded), on (a) the synthetic 1M x 512 store of ``benchmarks/scale_data.py`` with its index
  (raw-vector queries: stored vectors plus noise) and (b) imagenette embedded with the default
  backbone (image uploads: val JPEGs). p50 / p99 latency and queries per second per N, and, for the
  uploads, how many images each forward pass of the backbone carried (the server's micro-batcher:
  queries that arrive while a batch runs form the next one).

The server runs as its own process; the clients run in this one (threads, one httpx client each),
so at 16 clients the two compete for the same 2 cores: the figures are what one machine gives.
Peak RSS of the server is read from /proc/PID/status (VmHWM) when the run ends.

    python benchmarks/serve.py --work /tmp/serve-bench            # builds the stores once, then measures
    python benchmarks/serve.py --work /tmp/serve-bench --vectors-store S.h5 --images-store I.h5

Crash safety: scratch stores under --work (rebuilt when missing); the result JSON is written at the end.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scale import machine  # noqa: E402

IMAGENETTE = HERE.parent.parent / "shared" / "datasets" / "imagenette"


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-800:]}")
    return wall, out.stdout


def vectors_store(work: Path, rows: int) -> Path:
    """The synthetic 1M x 512 float16 store (scale_data.write_direct) with its automatic index."""
    store = work / f"vectors-{rows}.h5"
    if not store.exists():
        import scale_data

        root = work / "root"
        root.mkdir(parents=True, exist_ok=True)
        print(json.dumps(scale_data.write_direct(store, rows, root)), flush=True)
    if not Path(f"{store}.index").exists():
        wall, _ = run([sys.executable, "-m", "embedstore_cli.main", "index", str(store), "--json"])
        print(f"index built in {wall:.0f}s", flush=True)
    return store


def images_store(work: Path, data: Path, limit: int) -> tuple[Path, list[Path]]:
    """imagenette's train images (the first ``limit``) embedded with the default backbone, and its val
    images as queries."""
    store = work / f"imagenette-{limit}.h5"
    train = sorted((data / "train").rglob("*.JPEG"))[:limit]
    queries = sorted((data / "val").rglob("*.JPEG"))[:: max(1, len(list((data / "val").rglob("*.JPEG"))) // 200)]
    if not store.exists():
        listing = work / f"imagenette-{limit}.csv"
        with open(listing, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([str(p), p.parent.name] for p in train)
        wall, _ = run([sys.executable, "-m", "embedstore_cli.main", "embed", str(listing), "--store", str(store)])
        print(f"imagenette store ({len(train)} images) embedded in {wall:.0f}s", flush=True)
    return store, queries


class Server:
    """``embedstore serve STORE --port 0`` as a child process."""

    def __init__(self, store: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "embedstore_cli.main", "serve", str(store), "--port", "0",
                                      "--json", "--refresh", "0"], stdout=subprocess.PIPE, text=True)
        self.url = json.loads(self.proc.stdout.readline())["url"]
        import httpx

        for _ in range(600):
            try:
                httpx.get(f"{self.url}/api/info", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)

    def info(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/api/info", timeout=30).json()

    def peak_rss_gib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
        return round(kib / 2**20, 3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def load(url: str, clients: int, seconds: float, request: Callable[[Any, int], Any]) -> dict[str, Any]:
    """``clients`` threads sending requests back to back for ``seconds``: latency percentiles and rate."""
    import httpx

    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(c: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as h:
            i = c
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = request(h, i)
                lat[c].append(time.perf_counter() - t0)
                errors[c] += r.status_code != 200
                i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    every = [x for xs in lat for x in xs]
    return {"clients": clients, "queries": len(every), "errors": sum(errors), "seconds": round(wall, 2),
            "qps": round(len(every) / wall, 1), "p50_ms": round(pct(every, 50), 2), "p99_ms": round(pct(every, 99), 2)}


def single(cli: list[str], served_cli: list[str], url: str, body: Callable[[Any, int], Any], repeats: int) -> dict[str, Any]:
    """One query: a fresh ``embedstore search`` process, a fresh ``--server`` client process, one request."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as h:
        for i in range(5):
            body(h, i)  # warm-up
    process = [run(cli)[0] for _ in range(repeats)]
    client_process = [run(served_cli)[0] for _ in range(repeats)]
    with httpx.Client(base_url=url, timeout=120) as h:
        request = []
        for i in range(max(50, repeats)):
            t0 = time.perf_counter()
            assert body(h, i).status_code == 200
            request.append(time.perf_counter() - t0)
    p, c, r = (statistics.median(x) for x in (process, client_process, request))
    return {"process_s": round(p, 3), "client_process_s": round(c, 3), "request_ms": round(r * 1000, 2),
            "ratio_process_vs_request": round(p / r, 1), "ratio_process_vs_client_process": round(p / c, 1),
            "repeats": repeats, "requests": len(request)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="Scratch folder for the stores.")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--imagenette", type=Path, default=IMAGENETTE)
    ap.add_argument("--images", type=int, default=2000, help="imagenette train images in the image store.")
    ap.add_argument("--seconds", type=float, default=15.0, help="Length of each load level.")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=5, help="Fresh processes per cold measurement.")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    emb = [sys.executable, "-m", "embedstore_cli.main"]

    vstore = vectors_store(args.work, args.rows)
    rng = np.random.default_rng(0)
    server = Server(vstore)
    try:
        import embedstore

        sp = embedstore.open_store(vstore).space()
        rows = rng.choice(len(sp), 256, replace=False)
        qv = np.asarray(sp.vectors[np.sort(rows)], np.float32) + rng.normal(0, 0.01, (256, sp.dim)).astype(np.float32)
        vec_body = lambda h, i: h.post("/api/search", json={"vectors": [qv[i % 256].tolist()], "k": 10})  # noqa: E731
        row_body = lambda h, i: h.post("/api/search", json={"rows": [int(rows[i % 256])], "k": 10})  # noqa: E731
        r0 = int(rows[0])
        result["vectors"] = {
            "store": {"rows": len(sp), "dim": sp.dim, "dtype": str(sp.vectors.dtype),
                      "index": server.info()["spaces"][0]["index"]},
            "single_row_query": single(emb + ["search", str(vstore), "--row", str(r0), "--json"],
                                       emb + ["search", "--server", server.url, "--row", str(r0), "--json"],
                                       server.url, row_body, args.repeats),
            "load": [load(server.url, n, args.seconds, vec_body) for n in args.clients],
            "server_peak_rss_gib": server.peak_rss_gib(),
        }
        print(json.dumps(result["vectors"], indent=1), flush=True)
    finally:
        server.stop()

    if args.imagenette.is_dir():
        istore, queries = images_store(args.work, args.imagenette, args.images)
        blobs = [q.read_bytes() for q in queries]
        server = Server(istore)
        try:
            img_body = lambda h, i: h.post("/api/search/image?k=10",  # noqa: E731
                                           files={"file": (queries[i % len(queries)].name, blobs[i % len(blobs)])})
            result["images"] = {
                "store": {"images": args.images, "queries": len(queries), "backbone": server.info()["spaces"][0]["backbone"]},
                "single_image_query": single(emb + ["search", str(istore), "--query", str(queries[0]), "--json"],
                                             emb + ["search", "--server", server.url, str(queries[0]), "--json"],
                                             server.url, img_body, args.repeats),
                "load": [],
            }
            for n in args.clients:
                before = server.info()["backbones"][0]
                level = load(server.url, n, args.seconds, img_body)
                after = server.info()["backbones"][0]
                images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
                level["images_per_forward_pass"] = round(images / max(1, batches), 2)
                result["images"]["load"].append(level)
            result["images"]["server_peak_rss_gib"] = server.peak_rss_gib()
            print(json.dumps(result["images"], indent=1), flush=True)
        finally:
            server.stop()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    result["git_head"] = git.stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
