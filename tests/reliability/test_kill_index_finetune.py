"""SIGKILL `embedstore index` and `embedstore finetune` at random moments.

After every kill the store opens, a search still answers from a whole index (the previous
generation or the new one, never a mix), and the fine-tune checkpoint is complete; every rerun
completes, and the final index / fine-tuned space equals one built without interruption.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import embedstore
from faultkit import KillReport, cli, kill_loop, timed_run
from imagegen import TINY_BACKBONE, make_collection
from embedstore.index import index_files, load_index, normalized

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_index import clustered, write_store  # noqa: E402

KILLS = 10  # per phase; two phases each


def _index_state(store: Path) -> tuple[np.ndarray, np.ndarray, str]:
    loaded = load_index(store)
    return loaded.rows, loaded.fingerprints, loaded.info["factory"]


def test_killed_index_builds_leave_a_whole_index_and_converge(tmp_path: Path) -> None:
    data = clustered(60_000, dim=64, seed=3)
    cmd = lambda s, *extra: cli("index", str(s), "--kind", "ivf-flat", "--json", *extra)  # noqa: E731
    reference, store = tmp_path / "ref" / "s.h5", tmp_path / "killed" / "s.h5"
    for s in (reference, store):
        s.parent.mkdir()
        write_store(s, data[:50_000])
    full_run = timed_run(cmd(reference))

    served: list[int] = []

    def whole_index_or_none_yet(report: KillReport) -> None:
        if not index_files(store, "syn").sidecar.exists():
            assert not report.completed_runs, "an index built before was lost"
            return
        loaded = load_index(store)  # never a mix of generations, never a half-written file
        sp = embedstore.open_store(store).space()
        scores, rows = loaded.index.search(normalized(sp.vectors, np.array([11])), 1)
        assert rows[0, 0] == 11 and scores[0, 0] > 0.99
        served.append(len(loaded.rows))

    # 1: every run builds from scratch; a kill leaves the previous generation (or none yet) served
    first = kill_loop(cmd(store, "--rebuild"), store, KILLS, max_delay=full_run, min_delay=0.2 * full_run, seed=4,
                      after_kill=whole_index_or_none_yet)
    assert _index_state(store)[0].tolist() == _index_state(reference)[0].tolist()

    # 2: the store grows; each run extends the 50k index (put back whenever a run got to the end)
    for s in (reference, store):
        write_store(s, data)
    t0 = time.perf_counter()
    grown = subprocess.run(cmd(reference), capture_output=True, text=True, check=True)
    extend_run = time.perf_counter() - t0
    assert json.loads(grown.stdout)["mode"] == "incremental"
    folder = index_files(store, "syn").sidecar.parent
    saved = shutil.copytree(folder, tmp_path / "index-50k")

    def back_to_50k(report: KillReport) -> None:
        if json.loads(index_files(store, "syn").sidecar.read_text())["rows"] == 60_000:
            shutil.rmtree(folder)
            shutil.copytree(saved, folder)

    second = kill_loop(cmd(store), store, KILLS, max_delay=extend_run, min_delay=0.2 * extend_run, seed=5,
                       after_kill=whole_index_or_none_yet, before_run=back_to_50k)

    assert first.kills + second.kills == 2 * KILLS
    got, ref = _index_state(store), _index_state(reference)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]) and got[2] == ref[2]
    assert len(got[0]) == 60_000
    assert served and set(served) <= {50_000, 60_000}
    files = index_files(store, "syn")
    left = {p.name for p in files.sidecar.parent.iterdir()}
    assert left == {files.index.name, files.rows.name, files.sidecar.name, files.lock.name}  # no strays


def test_killed_finetune_resumes_into_the_uninterrupted_result(tmp_path: Path) -> None:
    src = make_collection(tmp_path / "imgs", per_class=8)
    base = tmp_path / "base.h5"
    embedstore.embed(src, base, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    reference, store = tmp_path / "ref" / "s.h5", tmp_path / "killed" / "s.h5"
    for s in (reference, store):
        s.parent.mkdir()
        shutil.copy(base, s)
    parent = embedstore.open_store(base).space().name
    cmd = lambda s: cli("finetune", str(s), "--out-space", "ft", "--unfreeze", "1", "--epochs", "3",  # noqa: E731
                        "--patience", "3", "--lr", "0.003", "--batch-size", "8", "--precision", "fp32",
                        "--workers", "0", "--seed", "0", "--quiet", "--json")
    t0 = time.perf_counter()
    whole = json.loads(subprocess.run(cmd(reference), capture_output=True, text=True, check=True).stdout)
    full_run = time.perf_counter() - t0

    def checkpoint_and_space_are_whole(report: KillReport) -> None:
        state_file = Path(f"{store}.finetune") / "ft" / "state.json"
        if state_file.exists():
            json.loads(state_file.read_text())  # complete JSON: replaced atomically
            for name in (p for p in Path(state_file.parent).iterdir() if not p.name.startswith(".")):
                assert name.stat().st_size > 0, name
        st = embedstore.open_store(store)
        if "ft" in st.spaces:  # re-embedding: a consistent prefix of the parent's rows
            rows = st.space("ft").rows
            assert len(set(rows.tolist())) == len(rows) and set(rows.tolist()) <= set(st.space(parent).rows.tolist())

    report = kill_loop(cmd(store), store, 2 * KILLS, max_delay=full_run, seed=6,
                       after_kill=checkpoint_and_space_are_whole)
    assert report.kills == 2 * KILLS
    resumed = json.loads(subprocess.run(cmd(store), capture_output=True, text=True, check=True).stdout)
    assert resumed["finished"] and resumed["weights_sha256"] == whole["weights_sha256"]
    got, ref = embedstore.open_store(store).space("ft"), embedstore.open_store(reference).space("ft")
    assert np.array_equal(got.rows, ref.rows) and len(got) == len(embedstore.open_store(store).space(parent))
    np.testing.assert_allclose(got.vectors.astype(np.float32), ref.vectors.astype(np.float32), atol=1e-2)
