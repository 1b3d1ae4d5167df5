"""Fault injection shared by tests/reliability and benchmarks/faults.py: kill real processes."""
from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import embedstore
from embedstore.store import journal_dir, list_parts


def cli(*args: str) -> list[str]:
    """An ``embedstore`` command run by this interpreter."""
    return [sys.executable, "-m", "embedstore_cli.main", *args]


def embed_cmd(src: str | Path, store: Path, backbone: str = "test_efficientnet", batch_size: int = 4,
              weights: str = "random") -> list[str]:
    return cli("embed", str(src), "--store", str(store), "--backbone", backbone, "--weights", weights,
               "--batch-size", str(batch_size), "--workers", "0", "--precision", "fp32", "--quiet", "--json")


def kill_resume_compare(tmp_path: Path, command: Callable[[Path], list[str]], expected: set[str],
                        wait: float = 180) -> dict[str, np.ndarray]:
    """Kill ``command(store)`` once it has published 3 journal parts (or after ``wait`` seconds), rerun it,
    and compare with an uninterrupted run (``tmp_path/reference.h5``): the resumed space holds exactly
    ``expected``, keeps what was embedded before the kill and matches the reference. Returns the vectors
    embedded before the kill."""
    store = tmp_path / "killed.h5"
    proc = subprocess.Popen(command(store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + wait
    while len(list_parts(store)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = embedstore.open_store(store)
    done_before = dict(zip(partial.space().paths, partial.space().vectors))
    assert 0 < len(done_before) < len(expected)

    rerun = subprocess.run(command(store), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = embedstore.open_store(store)
    sp = final.space()
    assert set(sp.paths) == expected and len(sp) == len(expected) and final.n_images == len(expected)
    assert not list_parts(store)
    now = dict(zip(sp.paths, sp.vectors))
    for path, vec in done_before.items():  # finished work is kept, not redone
        np.testing.assert_array_equal(now[path], vec)
    reference = tmp_path / "reference.h5"
    subprocess.run(command(reference), check=True, capture_output=True, timeout=300)
    ref = embedstore.open_store(reference).space()
    ref_by_path = dict(zip(ref.paths, ref.vectors.astype(np.float32)))
    assert set(ref_by_path) == set(now)
    for path, vec in now.items():
        np.testing.assert_allclose(vec.astype(np.float32), ref_by_path[path], rtol=1e-2, atol=1e-2)
    return done_before


@dataclass
class KillReport:
    kills: int = 0
    runs: int = 0
    completed_runs: int = 0
    delays: list[float] = field(default_factory=list)


def kill_loop(cmd: list[str], store: Path, kills: int, max_delay: float, seed: int = 0, min_delay: float = 0.0,
              after_kill: Callable[[KillReport], None] | None = None,
              before_run: Callable[[KillReport], None] | None = None) -> KillReport:
    """Start ``cmd`` again and again, SIGKILLing each at a random moment in [min_delay, max_delay],
    until ``kills`` kills; after every kill the store must open and ``after_kill(report)`` (a check
    of the caller's) must pass; finally run once to completion. ``before_run(report)`` runs before
    each start (to set up work for the next run, say)."""
    rng = random.Random(seed)
    report = KillReport()
    while report.kills < kills:
        if report.completed_runs > 2 * kills:
            raise AssertionError(f"{report.completed_runs} runs finished before their kill moment: "
                                 f"the kill window [{min_delay:.2f}, {max_delay:.2f}] s misses the work")
        if before_run is not None:
            before_run(report)
        delay = rng.uniform(min_delay, max_delay)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        report.runs += 1
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            report.kills += 1
            report.delays.append(delay)
            if store.exists() or list_parts(store):
                embedstore.open_store(store)  # readable after every kill
            if after_kill is not None:
                after_kill(report)
            continue
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.returncode != 0:
            raise AssertionError(f"run {report.runs} failed (exit {proc.returncode}):\n{stderr[-2000:]}")
        report.completed_runs += 1
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if final.returncode != 0:
        raise AssertionError(f"final run failed:\n{final.stderr[-2000:]}")
    report.runs += 1
    report.completed_runs += 1
    return report


def compare_stores(store: Path, reference: Path, atol: float = 1e-2) -> dict:
    """Rows lost / duplicated / vectors that differ between a killed-and-resumed store and a reference."""
    got, ref = embedstore.open_store(store), embedstore.open_store(reference)
    out = {"rows": 0, "rows_lost": 0, "rows_duplicated": 0, "rows_extra": 0, "vectors_differ": 0,
           "failures": len(got.failures), "reference_failures": len(ref.failures)}
    for name, rsp in ref.spaces.items():
        sp = got.spaces.get(name)
        paths = list(sp.paths) if sp is not None else []
        out["rows"] += len(paths)
        out["rows_duplicated"] += len(paths) - len(set(paths))
        mine = dict(zip(paths, sp.vectors.astype(np.float32))) if sp is not None else {}
        theirs = dict(zip(rsp.paths, rsp.vectors.astype(np.float32)))
        out["rows_lost"] += len(set(theirs) - set(mine))
        out["rows_extra"] += len(set(mine) - set(theirs))
        out["vectors_differ"] += sum(
            not np.allclose(mine[p], v, atol=atol, rtol=atol) for p, v in theirs.items() if p in mine
        )
    out["duplicate_images"] = got.n_images - len(set(got.images["path"]))
    return out


def consistent_prefix(store: Path, reference: Path) -> Callable[[KillReport], None]:
    """An ``after_kill`` check: what the killed store holds is a subset of the reference run,
    each image once, each vector the reference's."""

    def check(report: KillReport) -> None:
        if not (store.exists() or list_parts(store)):
            return
        diff = compare_stores(store, reference)
        bad = {k: diff[k] for k in ("rows_duplicated", "rows_extra", "vectors_differ", "duplicate_images") if diff[k]}
        assert not bad, f"after kill {report.kills}: {bad}"

    return check


def start_over_after_completion(store: Path) -> Callable[[KillReport], None]:
    """A ``before_run`` hook: once a run completed, delete the store so the next run has the whole
    job to do again (kills then land all through the work, not in no-op reruns)."""
    seen = [0]

    def reset(report: KillReport) -> None:
        if report.completed_runs > seen[0]:
            seen[0] = report.completed_runs
            store.unlink(missing_ok=True)
            shutil.rmtree(journal_dir(store), ignore_errors=True)

    return reset


def timed_run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0
