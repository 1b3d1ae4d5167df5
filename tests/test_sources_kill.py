"""A real embed process SIGKILLed mid-run resumes to the same store as an uninterrupted run, for each new
source: a folder of tar shards, a CSV of URLs served over HTTP, and a Hugging Face dataset (issue 20)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import embedstore
from embedstore.store import list_parts
from imagegen import TINY_BACKBONE
from sourcegen import ImageServer, hf_dataset, write_shard

N = 120
OPTIONS = ["--backbone", TINY_BACKBONE, "--weights", "random", "--batch-size", "4", "--workers", "0",
           "--precision", "fp32", "--quiet", "--json"]


def cli(src: str, store: Path) -> list[str]:
    return [sys.executable, "-m", "embedstore_cli.main", "embed", src, "--store", str(store), *OPTIONS]


def hf_script(saved: Path, store: Path) -> list[str]:
    code = ("import sys, datasets, embedstore\n"
            "ds = datasets.load_from_disk(sys.argv[1])\n"
            f"embedstore.embed(ds, sys.argv[2], backbone={TINY_BACKBONE!r}, weights='random', batch_size=4, "
            "workers=0, precision='fp32', progress=False)\n")
    return [sys.executable, "-c", code, str(saved), str(store)]


def kill_resume_compare(tmp_path: Path, command, expected: set[str]) -> dict[str, np.ndarray]:
    """Kill ``command(store)`` after 3 journal parts, rerun it, and compare with an uninterrupted run;
    returns the vectors embedded before the kill."""
    store = tmp_path / "killed.h5"
    proc = subprocess.Popen(command(store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
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


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_tar_shards(tmp_path: Path):
    root = tmp_path / "shards"
    for k in range(4):
        write_shard(root / f"shard-{k:03d}.tar", k * N // 4, N // 4, label="json" if k % 2 else "cls")
    expected = {f"shard-{i * 4 // N:03d}.tar/sample{i:05d}.jpg" for i in range(N)}
    kill_resume_compare(tmp_path, lambda store: cli(str(root), store), expected)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_urls(tmp_path: Path):
    with ImageServer() as server:
        urls = [f"{server.url}/img/{i}.{'png' if i % 2 else 'jpg'}" for i in range(N)]
        (tmp_path / "urls.csv").write_text("url\n" + "\n".join(urls) + "\n")
        hits_after_kill: dict[str, int] = {}

        def command(store: Path) -> list[str]:
            if store.name == "reference.h5" and not hits_after_kill:
                hits_after_kill.update(server.hits)  # the rerun is done: count before the reference run
            return cli(str(tmp_path / "urls.csv"), store)

        done_before = kill_resume_compare(tmp_path, command, set(urls))
        for url in done_before:  # embedded before the kill: not downloaded again by the rerun
            assert hits_after_kill[url[len(server.url):]] == 1, url


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_hf_dataset(tmp_path: Path):
    pytest.importorskip("datasets")
    saved = tmp_path / "ds"
    ds = hf_dataset(N)
    ds.save_to_disk(str(saved))
    kill_resume_compare(tmp_path, lambda store: hf_script(saved, store), {f"dataset/{i}" for i in range(N)})
