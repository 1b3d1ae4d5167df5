"""A real `embedstore embed` process SIGKILLed mid-run resumes with nothing lost or duplicated."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import embedstore
from imagegen import TINY_BACKBONE, make_collection
from embedstore.store import StoreWriter, list_parts


def embed_cmd(src: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "embedstore_cli.main", "embed", str(src), "--store", str(store),
            "--backbone", TINY_BACKBONE, "--weights", "random", "--batch-size", "4", "--workers", "0",
            "--precision", "fp32", "--quiet", "--json"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path: Path):
    src = make_collection(tmp_path / "imgs", per_class=40, splits=())
    (src / "red_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    store = tmp_path / "killed.h5"
    proc = subprocess.Popen(embed_cmd(src, store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list_parts(store)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    partial = embedstore.open_store(store)  # readable right after the kill: a consistent prefix
    done_before = dict(zip(partial.space().paths, partial.space().vectors))
    assert 0 < len(done_before) < 120

    rerun = subprocess.run(embed_cmd(src, store), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    final = embedstore.open_store(store)
    sp = final.space()
    assert len(sp) == 120 and len(set(sp.paths)) == 120 and len(set(sp.rows.tolist())) == 120
    assert final.n_images == 120 and [Path(f["path"]).name for f in final.failures] == ["broken.jpg"]
    assert not list_parts(store)
    now = dict(zip(sp.paths, sp.vectors))
    for path, vec in done_before.items():  # finished work is kept, not redone
        np.testing.assert_array_equal(now[path], vec)

    reference = tmp_path / "reference.h5"
    subprocess.run(embed_cmd(src, reference), check=True, capture_output=True, timeout=300)
    ref = embedstore.open_store(reference).space()
    ref_by_path = dict(zip(ref.paths, ref.vectors.astype(np.float32)))
    assert set(ref_by_path) == set(now)
    for path, vec in now.items():
        np.testing.assert_allclose(vec.astype(np.float32), ref_by_path[path], rtol=1e-2, atol=1e-2)


def test_second_concurrent_writer_is_refused(tmp_path: Path):
    src = make_collection(tmp_path / "imgs", per_class=2, splits=())
    store = tmp_path / "s.h5"
    with StoreWriter(store):  # this test process is the first writer
        second = subprocess.run(embed_cmd(src, store), capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert "being written by pid" in second.stderr and str(store) in second.stderr
    after = subprocess.run(embed_cmd(src, store), capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stderr
