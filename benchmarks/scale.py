"""Issue 17: what each command costs as the store grows, beside the raw work it has to do.

For synthetic 512-d float16 stores of N vectors (``--sizes 1M,10M,30M``; default 1M), written part by
part in clip-retrieval's layout and then imported (``scale_data.py``: clustered vectors, 10k rows
labelled with 10 classes and a train/val split, the rest unlabelled), runs each command as its own
cold process (a fresh interpreter; the OS page cache is left warm) and measures its wall time and
peak RSS from the OS (``os.wait4`` -> ``ru_maxrss``: the process and its waited-for children):

    write       the store from the layout (import_vectors when it exists, else commit_arrays); once
    info        embedstore info STORE --json
    index       embedstore index STORE --memory 8G --json; once per size (it is the build); its recall@10
    search      embedstore search STORE --row 42 --json, cold, with the index built
    classify    embedstore classify STORE --models logreg --no-confusion --json (the 10k labelled rows)
    merge       embedstore merge TARGET HALF_A HALF_B --keep --json (the halves written as two stores)
    duplicates  embedstore duplicates STORE --json; at sizes up to --duplicates-max (1M); once

each repeated ``--repeats`` times (median), interleaved with its baseline from ``scale_raw.py``: the
minimal raw operation on the same files (h5py + faiss + sklearn), so the table shows embedstore's
overhead over the work itself. Writes JSON (machine from lscpu; per size and command: median wall,
peak RSS, every run, failures) and prints a Markdown table (rows = commands, columns = sizes, cells
"wall s / RSS GiB") with each command's growth between sizes. A command that fails (error, out of
memory, over ``--timeout``) is recorded as such and the run goes on. Synthetic data lives under
``--work`` and is deleted afterwards unless ``--keep``.

    python benchmarks/scale.py                                  # 1M
    python benchmarks/scale.py --sizes 1M,10M,30M --repeats 3
    python benchmarks/scale.py --code /tmp/before --out benchmarks/results/scale_before.json
    python benchmarks/scale.py engines ...                      # the local-vs-Ray benchmark (scale_engines.py)

``--code DIR`` puts another checkout first on PYTHONPATH for every measured process (``git archive
HEAD embedstore cli | tar -x -C DIR && ln -s cli DIR/embedstore_cli``): "before" figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from scale_data import parse_size, size_name  # noqa: E402
from scale_report import COMMANDS, render  # noqa: E402

GIB = 1024 ** 3


def machine() -> dict[str, Any]:
    """CPU model (lscpu), cores, RAM, load, library versions."""
    out: dict[str, Any] = {"cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
                           "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        out["cpu"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.CalledProcessError):
        out["cpu"] = platform.processor() or platform.machine()
    with open("/proc/meminfo") as f:
        mem = dict(ln.split(":", 1) for ln in f)
    out["ram_gib"] = round(int(mem["MemTotal"].split()[0]) * 1024 / GIB, 1)
    out["load_avg_start"] = [round(x, 2) for x in os.getloadavg()]
    for mod in ("faiss", "h5py", "numpy", "sklearn"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def measure(cmd: list[str], env: dict[str, str], out_file: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` as a fresh process; wall seconds, peak RSS (KiB, the OS's) and exit status."""
    with open(out_file, "wb") as out, open(out_file.with_suffix(".err"), "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen not to wait again
    run: dict[str, Any] = {"wall_s": round(wall, 3), "rss_kib": int(usage.ru_maxrss), "rc": p.returncode,
                           "load_1m_after": round(os.getloadavg()[0], 2)}
    if killed.is_set():
        run["error"] = f"timeout after {timeout:.0f}s"
    elif p.returncode != 0:
        tail = out_file.with_suffix(".err").read_text(errors="replace").strip().splitlines()[-3:]
        why = "killed by signal %d (out of memory?)" % -p.returncode if p.returncode < 0 else f"exit {p.returncode}"
        run["error"] = f"{why}: {' | '.join(tail)[-600:]}"
    return run


def parse_json(path: Path) -> Any:
    """The JSON object a command printed (None when absent, unreadable or over 200 MB)."""
    try:
        if path.stat().st_size > 200e6:
            return None
        text = path.read_text()
        return json.loads(text[text.index("{"):]) if "{" in text else None
    except (OSError, ValueError):
        return None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"runs": runs, "ok": len(ok) == len(runs) and bool(runs)}
    if ok:
        out["wall_s"] = round(statistics.median(r["wall_s"] for r in ok), 3)
        out["rss_gib"] = round(statistics.median(r["rss_kib"] for r in ok) * 1024 / GIB, 3)
        out["rss_gib_max"] = round(max(r["rss_kib"] for r in ok) * 1024 / GIB, 3)
    if len(ok) < len(runs):
        out["error"] = next(r["error"] for r in runs if "error" in r)
    return out


def extract(cmd: str, data: Any) -> dict[str, Any]:
    """The few fields of a command's JSON output worth keeping."""
    if not isinstance(data, dict):
        return {}
    if cmd == "index":
        return {k: data.get(k) for k in ("kind", "factory", "params", "rows", "recall_at_10", "recall_queries",
                                          "latency_p50_ms", "stages", "bytes", "mode") if k in data}
    if cmd == "search":
        res = data.get("results") or [[]]
        return {"hits": [h.get("row") for h in res[0]], "exact": data.get("exact")}
    if cmd == "classify":
        best = data.get("best") or {}
        return {"model": best.get("model"), "accuracy": best.get("accuracy"), "evaluation": data.get("evaluation")}
    if cmd == "duplicates":
        return {"groups": len(data.get("groups") or []), **{k: v for k, v in data.items() if k != "groups"
                                                             and not isinstance(v, (list, dict))}}
    if cmd in ("write", "merge"):
        return {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
    return {}


def free_gb(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 1e9


def run_size(n: int, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Every command at one size; the data is written first and removed afterwards unless --keep."""
    name = size_name(n)
    work = args.work / name
    py, es = sys.executable, shutil.which("embedstore") or "embedstore"
    data, raw = str(HERE / "scale_data.py"), str(HERE / "scale_raw.py")
    layout, half_a, half_b = work / "layout", work / "half_a", work / "half_b"
    store, store_a, store_b, target = work / "s.h5", work / "a.h5", work / "b.h5", work / "merged.h5"
    images_root = work / "images"
    result: dict[str, Any] = {"n": n, "commands": {}}
    if work.exists():
        shutil.rmtree(work)
    gb = n * 512 * 2 / 1e9  # one copy of the vectors
    need = gb * 5  # at most 5 copies at once: layout + store + halves + raw write, later store + halves + 2 merges
    result["disk_free_gb_before"] = round(free_gb(args.work), 1)
    result["skipped"] = {}
    direct = False  # write the store without a layout (generated in memory), when even that does not fit
    if free_gb(args.work) < need + 5:  # the layout, the import's journal and the store: no merge, no raw write
        why = f"needs about {need:.0f} GB free under {args.work}, has {free_gb(args.work):.0f} GB"
        result["skipped"].update({"merge": why, "write raw": why})
        need = gb * 3.1
        if free_gb(args.work) < need + 5:  # the journal and the store it is folded into
            direct, need = True, gb * 2.1
    if free_gb(args.work) < need + 5:
        result["error"] = f"needs about {need:.0f} GB free under {args.work}, has {free_gb(args.work):.0f} GB"
        print(f"{name}: skipped ({result['error']})", flush=True)
        return result
    if args.direct and not direct:
        direct = True
        result["skipped"].update({"merge": "--direct", "write raw": "--direct"})
    for what, why in result["skipped"].items():
        print(f"  {name:>5} {what}: skipped ({why})", flush=True)
    work.mkdir(parents=True)
    cmds = result["commands"]

    def one(cmd: str, side: str, argv: list[str], repeats: int, before: Any = None) -> dict[str, Any]:
        runs = []
        for k in range(repeats):
            if before:
                before()
            out_file = work / f"{cmd}.{side}.{k}.out"
            r = measure(argv, env, out_file, args.timeout)
            parsed = parse_json(out_file)
            if k == 0:
                r["output"] = extract(cmd, parsed) if side == "embedstore" else parsed
            runs.append(r)
            status = r.get("error", "ok")
            print(f"  {name:>5} {cmd:<10} {side:<10} {r['wall_s']:8.2f} s {r['rss_kib'] / 2**20:6.2f} GiB  {status[:160]}",
                  flush=True)
            if "error" in r:
                break  # a failure repeats; go on with the next command
        entry = cmds.setdefault(cmd, {})
        entry[side] = summarise(runs)
        return entry[side]

    def wanted(cmd: str) -> bool:
        return cmd in args.commands

    t0 = time.perf_counter()
    if direct:
        result["write_method"] = "generated in memory, committed part by part (no layout: disk)"
        one("write", "embedstore", [py, data, "direct", str(store), "--rows", str(n), "--root", str(images_root),
                                    "--part-rows", str(args.part_rows)], 1)
    else:
        lay = measure([py, data, "layout", str(layout), "--rows", str(n), "--part-rows", str(args.part_rows)], env,
                      work / "layout.out", args.timeout)
        result["layout"] = lay
        print(f"  {name:>5} {'layout':<10} {'generate':<10} {lay['wall_s']:8.2f} s {lay['rss_kib'] / 2**20:6.2f} GiB",
              flush=True)
        if "error" in lay:
            result["error"] = lay["error"]
            return result
        from scale_data import halves

        halves(layout, half_a, half_b)
        one("write", "embedstore", [py, data, "write", str(layout), str(store), "--root", str(images_root)], 1)
        if wanted("write") and "write raw" not in result["skipped"]:
            one("write", "raw", [py, raw, "write", str(layout), str(work / "raw_write.h5")], 1)
            (work / "raw_write.h5").unlink(missing_ok=True)
    if not cmds["write"]["embedstore"]["ok"]:
        result["error"] = "the store could not be written: " + cmds["write"]["embedstore"].get("error", "")
        return result
    result["store_bytes"] = store.stat().st_size
    if wanted("merge") and "merge" not in result["skipped"]:
        for lay_dir, st in ((half_a, store_a), (half_b, store_b)):
            r = measure([py, data, "write", str(lay_dir), str(st), "--root", str(images_root)], env,
                        work / f"{st.stem}.write.out", args.timeout)
            result.setdefault("write_halves", []).append(r)
    if not args.keep:
        shutil.rmtree(layout, ignore_errors=True)
        shutil.rmtree(half_a, ignore_errors=True)
        shutil.rmtree(half_b, ignore_errors=True)

    if wanted("index"):
        idx = one("index", "embedstore", [es, "index", str(store), "--memory", args.memory, "--json"], 1)
        out = (idx["runs"][0].get("output") or {})
        result["recall_at_10"] = out.get("recall_at_10")
        result["index_factory"] = out.get("factory")
        if n > args.raw_index_max:
            result["skipped"]["index raw"] = f"over --raw-index-max {size_name(args.raw_index_max)}"
        elif out.get("factory") and not args.no_raw_index:
            one("index", "raw", [py, raw, "index", str(store), str(work / "raw.faiss"), "--factory", out["factory"]], 1)
            (work / "raw.faiss").unlink(missing_ok=True)

    def drop_target() -> None:
        for p in [*work.glob(f"{target.name}*"), work / "raw_merged.h5"]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    plan = [("info", [es, "info", str(store), "--json"], [py, raw, "info", str(store)], None),
            ("search", [es, "search", str(store), "--row", "42", "--json"], [py, raw, "search", str(store)], None),
            ("classify", [es, "classify", str(store), "--models", "logreg", "--no-confusion", "--json"],
             [py, raw, "classify", str(store)], None),
            ("merge", [es, "merge", str(target), str(store_a), str(store_b), "--keep", "--json"],
             [py, raw, "merge", str(store_a), str(store_b), str(work / "raw_merged.h5")], drop_target)]
    for cmd, mine, base, before in plan:
        if not wanted(cmd) or (cmd == "merge" and not (store_a.exists() and store_b.exists())):
            continue
        if cmd == "search" and "index" in cmds and not cmds["index"]["embedstore"]["ok"]:
            print(f"  {name:>5} search: no index was built; searching exactly", flush=True)
        for k in range(args.repeats):  # interleaved, so machine load hits both sides alike
            for side, argv in (("embedstore", mine), ("raw", base)):
                prev = cmds.get(cmd, {}).get(side)
                if prev and not prev["ok"]:
                    continue
                got = one(cmd, side, argv, 1, before)
                if prev:  # fold this run into the earlier ones
                    cmds[cmd][side] = summarise(prev["runs"] + got["runs"])
        drop_target()
    found = [(cmds.get("search", {}).get(side) or {}).get("runs", [{}])[0].get("output") or {}
             for side in ("embedstore", "raw")]
    if found[0].get("hits") and found[1].get("hits"):  # the same index, so the same rows
        result["search_same_hits_as_raw"] = found[0]["hits"] == found[1]["hits"]
    if wanted("duplicates") and n <= args.duplicates_max:
        if (Path(f"{store}.index")).exists():
            one("duplicates", "embedstore", [es, "duplicates", str(store), "--json"], args.duplicates_repeats)
            q = args.raw_duplicates_queries
            base = one("duplicates", "raw", [py, raw, "duplicates", str(store)] + (["--queries", str(q)] if q < n else []),
                       args.duplicates_repeats)
            out = base["runs"][0].get("output") or {}
            if "wall_s" in base and out.get("queries", n) < n:  # measured on q queries: scale the search to all n
                base["measured_wall_s"] = base["wall_s"]
                base["wall_s"] = round(base["wall_s"] + out["search_s"] * (n / out["queries"] - 1), 3)
                base["extrapolated"] = f"search time of {out['queries']} queries scaled to {n} (RSS as measured)"
        else:
            cmds["duplicates"] = {"embedstore": {"ok": False, "runs": [], "error": "no index was built"}}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["disk_free_gb_after"] = round(free_gb(args.work), 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def remeasure(spec: str, args: argparse.Namespace, env: dict[str, str], result: dict[str, Any]) -> None:
    """``--existing NAME=STORE``: measure the commands (index once, then info, search and classify, of
    --commands) again on a store already written, interleaved with their baselines, replacing those commands of
    size NAME in ``result`` (e.g. after a run whose code could not run one of them)."""
    name, store = spec.split("=", 1)
    py, es, raw = sys.executable, shutil.which("embedstore") or "embedstore", str(HERE / "scale_raw.py")
    work = args.work / f"existing-{name}"
    work.mkdir(parents=True, exist_ok=True)
    size = result["sizes"].setdefault(name, {"n": parse_size(name), "commands": {}})
    plan = {"index": ([es, "index", store, "--memory", args.memory, "--json"], None),  # once, before the others
            "info": ([es, "info", store, "--json"], [py, raw, "info", store]),
            "search": ([es, "search", store, "--row", "42", "--json"], [py, raw, "search", store]),
            "classify": ([es, "classify", store, "--models", "logreg", "--no-confusion", "--json"],
                         [py, raw, "classify", store])}
    for cmd in [c for c in plan if c in args.commands]:
        runs: dict[str, list[dict[str, Any]]] = {"embedstore": []} if cmd == "index" else {"embedstore": [], "raw": []}
        for k in range(1 if cmd == "index" else args.repeats):
            for side, argv in zip(runs, plan[cmd]):
                r = measure(argv, env, work / f"{cmd}.{side}.{k}.out", args.timeout)
                if k == 0:
                    parsed = parse_json(work / f"{cmd}.{side}.{k}.out")
                    r["output"] = extract(cmd, parsed) if side == "embedstore" else parsed
                runs[side].append(r)
                print(f"  {name:>5} {cmd:<10} {side:<10} {r['wall_s']:8.2f} s {r['rss_kib'] / 2**20:6.2f} GiB  "
                      f"{r.get('error', 'ok')[:160]}", flush=True)
        size["commands"][cmd] = {side: summarise(rs) for side, rs in runs.items()}
        if cmd == "index":
            out = runs["embedstore"][0].get("output") or {}
            size["recall_at_10"], size["index_factory"] = out.get("recall_at_10"), out.get("factory")
        size.setdefault("remeasured", {})[cmd] = {"git_head": result["git_head"], "code": result["code"],
                                                  "store": store}
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engines"]:
        from scale_engines import main as engines

        return engines(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M", help="Comma list of store sizes: 1M,10M,30M (k and M suffixes).")
    ap.add_argument("--repeats", type=int, default=3, help="Cold runs per command (median reported).")
    ap.add_argument("--duplicates-max", type=parse_size, default=parse_size("1M"), help="Run duplicates up to this size.")
    ap.add_argument("--duplicates-repeats", type=int, default=1, help="Runs of duplicates (it is the slowest).")
    ap.add_argument("--raw-duplicates-queries", type=parse_size, default=parse_size("100k"),
                    help="The raw duplicates baseline searches this many rows and scales its time up to all rows.")
    ap.add_argument("--commands", default=",".join(COMMANDS), help="Comma list of the commands to measure.")
    ap.add_argument("--memory", default="8G", help="embedstore index --memory.")
    ap.add_argument("--no-raw-index", action="store_true", help="Skip the raw faiss build beside embedstore index.")
    ap.add_argument("--raw-index-max", type=parse_size, default=parse_size("10M"),
                    help="Build the raw faiss baseline index only up to this size (it takes as long as ours).")
    ap.add_argument("--direct", action="store_true",
                    help="Write the stores generated in memory, without the layout (chosen anyway when disk is short).")
    ap.add_argument("--existing", default=None, metavar="NAME=STORE",
                    help="Measure info/search/classify (of --commands) again on a written, indexed store and put "
                         "them under size NAME of --out (implies --add; --sizes is ignored).")
    ap.add_argument("--add", action="store_true",
                    help="Keep the other sizes already in --out (measured on the same CPU) and add these.")
    ap.add_argument("--timeout", type=float, default=1800, help="Seconds before a command is killed (and recorded).")
    ap.add_argument("--part-rows", type=int, default=100_000, help="Rows per img_emb_<i>.npy part.")
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/scale"), help="Folder for the synthetic data.")
    ap.add_argument("--code", type=Path, default=None, help="A checkout to put first on PYTHONPATH (before figures).")
    ap.add_argument("--keep", action="store_true", help="Keep the synthetic stores and layouts.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args(argv)
    args.commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = set(args.commands) - set(COMMANDS)
    if unknown:
        sys.exit(f"unknown command(s) {sorted(unknown)}: choose from {', '.join(COMMANDS)}")
    sizes = [] if args.existing else [parse_size(s) for s in args.sizes.split(",")]
    args.add = args.add or bool(args.existing)
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join([str(args.code.resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--short", "embedstore", "cli"], capture_output=True,
                           text=True).stdout.split("\n")
    result: dict[str, Any] = {
        "machine": machine(), "code": str(args.code) if args.code else f"working tree of {git[:10]}",
        "git_head": git, "uncommitted": [] if args.code else [ln.strip() for ln in dirty if ln.strip()],
        "settings": {"repeats": args.repeats, "memory": args.memory, "dim": 512, "dtype": "float16",
                     "labelled": 10_000, "classes": 10, "part_rows": args.part_rows, "timeout_s": args.timeout,
                     "classify": "--models logreg --no-confusion", "cold": "fresh process per run; page cache warm"},
        "sizes": {},
    }
    if args.add and args.out.exists():
        old = json.loads(args.out.read_text())
        if old.get("machine", {}).get("cpu") != result["machine"]["cpu"]:
            sys.exit(f"{args.out} was measured on {old.get('machine', {}).get('cpu')!r}, not this CPU: drop --add")
        result["sizes"] = {k: v for k, v in old.get("sizes", {}).items() if k not in {size_name(n) for n in sizes}}
        result["earlier_runs"] = old.get("earlier_runs", []) + [{"sizes": list(old.get("sizes", {})),
                                                                 "git_head": old.get("git_head"),
                                                                 "uncommitted": old.get("uncommitted")}]
    t0 = time.perf_counter()
    if args.existing:
        remeasure(args.existing, args, env, result)
        args.out.write_text(json.dumps(result, indent=2, default=str))
    for n in sizes:
        print(f"{size_name(n)} vectors:", flush=True)
        result["sizes"][size_name(n)] = {**run_size(n, args, env), "git_head": git,
                                         "code": result["code"]}  # sizes measured by other runs keep theirs
        result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        result["seconds"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))  # after every size: a late failure keeps these
    print("\n" + render(result))
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
