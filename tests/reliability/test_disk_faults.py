"""Disk full, read-only folders, files changing under a run: clear errors, nothing lost."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import embedstore
from embedstore.store import list_parts
from faultkit import compare_stores, embed_cmd
from imagegen import draw_image, make_collection
from support.mounts import tmpfs

pytestmark = pytest.mark.slow  # real runs against a full, read-only or changing disk: python -m pytest -m slow


def test_disk_full_is_a_clear_error_and_the_run_resumes(tmp_path: Path):
    src = make_collection(tmp_path / "imgs", per_class=20, splits=())
    reference = tmp_path / "reference.h5"
    subprocess.run(embed_cmd(src, reference), check=True, capture_output=True)
    with tmpfs(tmp_path / "small", "1m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * 900_000)  # leaves room for a few journal parts only
        store = disk / "s.h5"
        full = subprocess.run(embed_cmd(src, store), capture_output=True, text=True)
        assert full.returncode == 1
        assert "no space left" in full.stderr and "Traceback" not in full.stderr
        committed = embedstore.open_store(store)  # what was committed is readable
        assert 0 < committed.n_images < 60
        filler.unlink()
        resumed = subprocess.run(embed_cmd(src, store), capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        diff = compare_stores(store, reference)
        assert (diff["rows"], diff["rows_lost"], diff["rows_duplicated"], diff["vectors_differ"]) == (60, 0, 0, 0)
        assert not list(disk.glob(".s.h5.tmp-*"))


def test_read_only_store_folder(tmp_path: Path):
    src = make_collection(tmp_path / "imgs", per_class=2, splits=())
    with tmpfs(tmp_path / "ro", "2m") as disk:
        store = disk / "s.h5"
        subprocess.run(embed_cmd(src, store), check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        draw_image("red_disc", 99).save(src / "red_disc" / "new.png")
        res = subprocess.run(embed_cmd(src, store), capture_output=True, text=True)
        assert res.returncode == 1 and "writable" in res.stderr and str(disk) in res.stderr
        assert embedstore.open_store(store).n_images == 6  # still readable
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        assert subprocess.run(embed_cmd(src, store), capture_output=True).returncode == 0
        assert embedstore.open_store(store).n_images == 7


def make_unreadable(path: Path) -> None:
    """chmod 000; as root (which reads anyway) the file becomes a directory of the same name."""
    if os.geteuid() != 0:
        path.chmod(0)
    else:
        path.unlink()
        path.mkdir()


def make_readable(path: Path, image_seed: int) -> None:
    if path.is_dir():
        path.rmdir()
    else:
        path.chmod(0o644)
    draw_image("blue_stripes", image_seed).save(path, format="PNG")


def test_files_deleted_replaced_or_unreadable_during_a_run(tmp_path: Path):
    src = make_collection(tmp_path / "imgs", per_class=40, splits=())
    victims = sorted((src / "red_disc").glob("*.png"))[-15:]
    store = tmp_path / "s.h5"
    proc = subprocess.Popen(embed_cmd(src, store, batch_size=1), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_parts(store) and time.time() < deadline:
        time.sleep(0.01)
    for i, v in enumerate(victims):  # while it runs: delete a third, replace a third, make a third unreadable
        if i % 3 == 0:
            v.unlink()
        elif i % 3 == 1:
            draw_image("blue_stripes", 1000 + i).save(v)
        else:
            make_unreadable(v)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    st = embedstore.open_store(store)
    sp = st.space()
    assert len(set(sp.paths)) == len(sp) == st.n_images
    errors = {Path(f["path"]).name: f["error"] for f in st.failures}
    assert set(errors.values()) == {"FileNotFoundError", "PermissionError" if os.geteuid() else "NotRegularFileError"}, errors
    assert len(sp) + len(errors) == 120  # every file embedded (old or new content) or recorded as failed
    unreadable = [v for i, v in enumerate(victims) if i % 3 == 2]
    # an unreadable file is retried once it is readable again; the rest of the store stays as it was
    for i, v in enumerate(unreadable):
        make_readable(v, 2000 + i)
    again = embedstore.embed(src, store, backbone="test_efficientnet", weights="random", workers=0, progress=False)
    assert again["failed"] == 0 and again["embedded"] <= 10  # files read before their swap are redone
    st2 = embedstore.open_store(store)
    assert {st2.abspath(p) for p in st2.images["path"]} >= {str(v) for v in unreadable}
    assert not {Path(f["path"]).name for f in st2.failures} & {v.name for v in unreadable}
    for p, h in zip(st2.images["path"], st2.images["hash"]):
        path = Path(st2.abspath(p))
        if path.exists():
            from embedstore._hashing import hash_file

            assert hash_file(str(path)) == h, p
