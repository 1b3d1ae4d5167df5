"""SIGKILL scenarios for `embedstore index` and `embedstore finetune`, shared by the tests and benchmarks/faults.py.

Each kills a real CLI process at random moments, checks the store after every kill (raising
AssertionError at the first broken promise), lets the last run finish and compares the result
with an uninterrupted run. The returned dict has the fields of the faults table.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

import embedstore
from embedstore.index import index_files, load_index, normalized
from faultkit import KillReport, cli, kill_loop, timed_run
from imagegen import TINY_BACKBONE, make_collection
from test_index import clustered, write_store  # tests/ is on the path: pytest's pythonpath, benchmarks/faults.py


def _run_json(cmd: list[str]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout), time.perf_counter() - t0


def index_kills(tmp: Path, first: int = 50_000, total: int = 60_000, kills: int = 10, seed: int = 0,
                dim: int = 64) -> dict[str, Any]:
    """``kills`` SIGKILLs during full builds over ``first`` vectors (``--rebuild`` every run), then
    ``kills`` more while the index is extended to ``total`` (put back to ``first`` rows whenever a
    run got to the end). After every kill a search must answer from a whole index."""
    data = clustered(total, dim=dim, seed=3)
    cmd = lambda s, *extra: cli("index", str(s), "--kind", "ivf-flat", "--json", *extra)  # noqa: E731
    reference, store = tmp / "ref" / "s.h5", tmp / "killed" / "s.h5"
    for s in (reference, store):
        s.parent.mkdir(parents=True)
        write_store(s, data[:first])
    full_run = timed_run(cmd(reference))
    served: list[int] = []

    def whole_index_or_none_yet(report: KillReport) -> None:
        if not index_files(store, "syn").sidecar.exists():
            assert not served and not report.completed_runs, "an index built before was lost"
            return
        loaded = load_index(store)  # never a mix of generations, never a half-written file
        sp = embedstore.open_store(store).space()
        probe = int(loaded.rows[len(loaded.rows) // 2])
        scores, rows = loaded.index.search(normalized(sp.vectors, np.array([probe])), 1)
        assert rows[0, 0] == probe and scores[0, 0] > 0.99, (probe, rows, scores)
        served.append(len(loaded.rows))

    t0 = time.perf_counter()
    rebuilds = kill_loop(cmd(store, "--rebuild"), store, kills, max_delay=full_run, min_delay=0.2 * full_run,
                         seed=seed, after_kill=whole_index_or_none_yet)
    assert load_index(store).rows.tolist() == load_index(reference).rows.tolist()

    for s in (reference, store):  # the store grows: the index is extended, not rebuilt
        write_store(s, data)
    grown, extend_run = _run_json(cmd(reference))
    assert grown["mode"] == "incremental"
    folder = index_files(store, "syn").sidecar.parent
    saved = shutil.copytree(folder, tmp / f"index-{first}")

    def back_to_first(report: KillReport) -> None:
        if json.loads(index_files(store, "syn").sidecar.read_text())["rows"] == total:
            shutil.rmtree(folder)
            shutil.copytree(saved, folder)

    extends = kill_loop(cmd(store), store, kills, max_delay=extend_run, min_delay=0.2 * extend_run, seed=seed + 1,
                        after_kill=whole_index_or_none_yet, before_run=back_to_first)
    got, ref = load_index(store), load_index(reference)
    files = index_files(store, "syn")
    left = {p.name for p in folder.iterdir()} - {files.index.name, files.rows.name, files.sidecar.name, files.lock.name}
    return {
        "stage": "index", "seed": seed, "faults_injected": rebuilds.kills + extends.kills, "inputs": total,
        "runs": rebuilds.runs + extends.runs, "runs_completed": rebuilds.completed_runs + extends.completed_runs,
        "rows": len(got.rows), "rows_lost": len(set(ref.rows.tolist()) - set(got.rows.tolist())),
        "rows_duplicated": len(got.rows) - len(set(got.rows.tolist())),
        "vectors_differ": _stale_rows(store, got),
        "same_factory": got.info["factory"] == ref.info["factory"], "stray_files": sorted(left),
        "served_after_kills": sorted(set(served)), "seconds": round(time.perf_counter() - t0, 1),
    }


def _stale_rows(store: Path, got: Any) -> int:
    """Indexed rows whose vector is not the store's current one (by the version it was added at)."""
    with embedstore.open_store(store) as st:
        sp = st.space("syn")
        pos = sp.positions_of(got.rows)
        return int((pos < 0).sum() + (got.versions[pos >= 0] != sp.versions[pos[pos >= 0]]).sum())


def finetune_kills(tmp: Path, per_class: int = 8, kills: int = 20, seed: int = 0, epochs: int = 3) -> dict[str, Any]:
    """``kills`` SIGKILLs during `embedstore finetune` (training and re-embedding) of a tiny
    network; after every kill the checkpoint is whole and the new space a consistent prefix."""
    src = make_collection(tmp / "imgs", per_class=per_class)
    base = tmp / "base.h5"
    embedstore.embed(src, base, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    reference, store = tmp / "ref" / "s.h5", tmp / "killed" / "s.h5"
    for s in (reference, store):
        s.parent.mkdir(parents=True)
        shutil.copy(base, s)
    parent = embedstore.open_store(base).space().name
    cmd = lambda s: cli("finetune", str(s), "--out-space", "ft", "--unfreeze", "1", "--epochs", str(epochs),  # noqa: E731
                        "--patience", str(epochs), "--lr", "0.003", "--batch-size", "8", "--precision", "fp32",
                        "--workers", "0", "--seed", "0", "--quiet", "--json")
    whole, full_run = _run_json(cmd(reference))

    def checkpoint_and_space_are_whole(report: KillReport) -> None:
        state_file = Path(f"{store}.finetune") / "ft" / "state.json"
        if state_file.exists():
            json.loads(state_file.read_text())  # complete JSON: replaced atomically
            for path in (p for p in state_file.parent.iterdir() if not p.name.startswith(".")):
                assert path.stat().st_size > 0, path
        st = embedstore.open_store(store)
        if "ft" in st.spaces:  # re-embedding: a consistent prefix of the parent's rows
            rows = st.space("ft").rows.tolist()
            assert len(set(rows)) == len(rows) and set(rows) <= set(st.space(parent).rows.tolist())

    t0 = time.perf_counter()
    report = kill_loop(cmd(store), store, kills, max_delay=full_run, seed=seed, after_kill=checkpoint_and_space_are_whole)
    resumed, _ = _run_json(cmd(store))
    st, ref_st = embedstore.open_store(store), embedstore.open_store(reference)
    got, ref = st.space("ft"), ref_st.space("ft")
    ref_vectors = dict(zip(ref.rows.tolist(), ref.vectors.astype(np.float32)))
    return {
        "stage": "finetune", "seed": seed, "faults_injected": report.kills, "inputs": st.n_images,
        "runs": report.runs + 1, "runs_completed": report.completed_runs + 1, "rows": len(got),
        "rows_lost": len(set(ref.rows.tolist()) - set(got.rows.tolist())),
        "rows_duplicated": len(got) - len(set(got.rows.tolist())),
        "vectors_differ": sum(not np.allclose(v, ref_vectors[r], atol=1e-2)
                              for r, v in zip(got.rows.tolist(), got.vectors.astype(np.float32)) if r in ref_vectors),
        "finished": bool(resumed["finished"]), "same_weights": resumed["weights_sha256"] == whole["weights_sha256"],
        "parent_rows": len(st.space(parent)), "seconds": round(time.perf_counter() - t0, 1),
    }
