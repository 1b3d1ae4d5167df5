"""A real `embedstore embed` process SIGKILLed mid-run resumes with nothing lost or duplicated."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import embedstore
from embedstore.data import discover
from embedstore.store import StoreWriter
from faultkit import embed_cmd, kill_resume_compare
from imagegen import make_collection


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path: Path):
    src = make_collection(tmp_path / "imgs", per_class=40, splits=())
    (src / "red_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    images = {it.rel for it in discover(src)[1]} - {"red_disc/broken.jpg"}
    assert len(images) == 120
    kill_resume_compare(tmp_path, lambda store: embed_cmd(src, store), images, wait=120)
    final = embedstore.open_store(tmp_path / "killed.h5")
    assert len(set(final.space().rows.tolist())) == 120
    assert [Path(f["path"]).name for f in final.failures] == ["broken.jpg"]


def test_second_concurrent_writer_is_refused(tmp_path: Path):
    src = make_collection(tmp_path / "imgs", per_class=2, splits=())
    store = tmp_path / "s.h5"
    with StoreWriter(store):  # this test process is the first writer
        second = subprocess.run(embed_cmd(src, store), capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert "being written by pid" in second.stderr and str(store) in second.stderr
    after = subprocess.run(embed_cmd(src, store), capture_output=True, text=True, timeout=120)
    assert after.returncode == 0, after.stderr
