"""Fault injection at length: many random SIGKILLs during `embedstore embed` (with hostile files),
`embedstore index` and `embedstore finetune`.

Prints a table — faults injected, inputs tried, runs completed, rows lost, rows duplicated
(both must be 0) — and writes JSON. The CI suite (tests/reliability) runs shorter versions of
the same scenarios.

    python benchmarks/faults.py --kills 60 --per-class 100
    python benchmarks/faults.py --stages index,finetune --kills 30 --index-rows 200000
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
from faultkit import (compare_stores, consistent_prefix, embed_cmd, kill_loop,  # noqa: E402
                      start_over_after_completion, timed_run)
from imagegen import make_collection  # noqa: E402
from scenarios import finetune_kills, index_kills  # noqa: E402
from test_hostile_input import hostile_folder  # noqa: E402

STAGES = ("embed", "index", "finetune")


def embed_kills(tmp: Path, per_class: int, kills: int, seeds: int) -> tuple[list[dict], float]:
    """The embed kill loop over generated images plus the hostile zoo, one row per seed."""
    rows = []
    src = make_collection(tmp / "imgs", per_class=per_class, splits=("train", "val"))
    must_embed, must_fail = hostile_folder(src / "train" / "zoo")
    n_inputs = 6 * per_class + len(must_embed) + len(must_fail)
    reference = tmp / "reference.h5"
    full = timed_run(embed_cmd(src, reference))
    for seed in range(seeds):
        store = tmp / f"killed-{seed}.h5"
        t0 = time.perf_counter()
        report = kill_loop(embed_cmd(src, store), store, kills=kills, max_delay=full, seed=seed,
                           after_kill=consistent_prefix(store, reference),
                           before_run=start_over_after_completion(store))
        diff = compare_stores(store, reference)
        rows.append({
            "stage": "embed", "seed": seed, "faults_injected": report.kills, "inputs": n_inputs, "runs": report.runs,
            "runs_completed": report.completed_runs, "rows": diff["rows"], "rows_lost": diff["rows_lost"],
            "rows_duplicated": diff["rows_duplicated"] + diff["duplicate_images"],
            "vectors_differ": diff["vectors_differ"], "failures_recorded": diff["failures"],
            "seconds": round(time.perf_counter() - t0, 1),
        })
        print(rows[-1], file=sys.stderr)
    return rows, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="embed", help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--kills", type=int, default=60, help="SIGKILLs per loop (index: per phase, two phases)")
    ap.add_argument("--per-class", type=int, default=100, help="generated images per class (3 classes x 2 splits)")
    ap.add_argument("--seeds", type=int, default=3, help="independent kill loops per stage")
    ap.add_argument("--index-rows", type=int, default=200_000, help="vectors of the index scenario (built, then +20%%)")
    ap.add_argument("--json-out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if set(stages) - set(STAGES):
        ap.error(f"unknown stage(s) {sorted(set(stages) - set(STAGES))}: choose from {', '.join(STAGES)}")

    rows: list[dict] = []
    meta: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "embed" in stages:
            embed_rows, full = embed_kills(tmp / "embed", args.per_class, args.kills, args.seeds)
            rows += embed_rows
            meta["embed_reference_run_s"] = round(full, 1)
        for seed in range(args.seeds if "index" in stages else 0):
            first = args.index_rows * 5 // 6
            rows.append(index_kills(tmp / f"index-{seed}", first=first, total=args.index_rows, kills=args.kills,
                                    seed=10 * seed + 4))
            print(rows[-1], file=sys.stderr)
        for seed in range(args.seeds if "finetune" in stages else 0):
            rows.append(finetune_kills(tmp / f"finetune-{seed}", kills=args.kills, seed=10 * seed + 6))
            print(rows[-1], file=sys.stderr)
    header = ["stage", "seed", "faults_injected", "inputs", "runs", "runs_completed", "rows", "rows_lost",
              "rows_duplicated", "vectors_differ", "failures_recorded", "seconds"]
    table = [[r.get(h, "-") for h in header] for r in rows]
    widths = [max(len(str(x)) for x in [h] + [t[i] for t in table]) for i, h in enumerate(header)]
    for line in [header, ["-" * w for w in widths], *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"embedstore": embedstore.__version__, **meta, "results": rows}, indent=2))
    print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
