"""Fault injection at length: many random SIGKILLs during `embedstore embed`, hostile files.

Prints a table — faults injected, inputs tried, runs completed, rows lost, rows duplicated
(both must be 0) — and writes JSON. The CI suite (tests/reliability) runs a shorter version.

    python benchmarks/faults.py --kills 60 --per-class 100
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "reliability")]

import embedstore  # noqa: E402
from faultkit import compare_stores, embed_cmd, kill_loop, timed_run  # noqa: E402
from imagegen import make_collection  # noqa: E402
from test_hostile_input import hostile_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--per-class", type=int, default=100, help="generated images per class (3 classes x 2 splits)")
    ap.add_argument("--seeds", type=int, default=3, help="independent kill loops")
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_collection(tmp / "imgs", per_class=args.per_class, splits=("train", "val"))
        must_embed, must_fail = hostile_folder(src / "train" / "zoo")
        n_inputs = 6 * args.per_class + len(must_embed) + len(must_fail)
        reference = tmp / "reference.h5"
        full = timed_run(embed_cmd(src, reference))
        for seed in range(args.seeds):
            store = tmp / f"killed-{seed}.h5"
            t0 = time.perf_counter()
            report = kill_loop(embed_cmd(src, store), store, kills=args.kills, max_delay=full, seed=seed)
            diff = compare_stores(store, reference)
            rows.append({
                "seed": seed, "faults_injected": report.kills, "inputs": n_inputs, "runs": report.runs,
                "runs_completed": report.completed_runs, "rows": diff["rows"], "rows_lost": diff["rows_lost"],
                "rows_duplicated": diff["rows_duplicated"] + diff["duplicate_images"],
                "vectors_differ": diff["vectors_differ"], "failures_recorded": diff["failures"],
                "seconds": round(time.perf_counter() - t0, 1),
            })
            print(rows[-1], file=sys.stderr)
    header = list(rows[0])
    widths = [max(len(str(x)) for x in [h] + [r[h] for r in rows]) for h in header]
    for line in [header, ["-" * w for w in widths], *[[r[h] for h in header] for r in rows]]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"embedstore": embedstore.__version__, "reference_run_s": round(full, 1),
                                         "results": rows}, indent=2))
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
