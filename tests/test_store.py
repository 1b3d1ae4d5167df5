"""Writer stage: journal parts, atomic consolidation, locking, merging rules, clear errors."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from embedstore.errors import StoreError, StoreLockedError
from embedstore.store import (
    FAILURE_COLUMNS,
    Batch,
    StoreWriter,
    journal_dir,
    list_parts,
    open_store,
    write_file,
)
from support.mounts import tmpfs

ATTRS = {"backbone": "toy", "weights_sha256": "abc", "dim": 4, "dtype": "float16"}


def row(path: str, h: str = "h", label: str = "a") -> dict:
    return dict(path=path, label=label, split="train", size=10, hash=h, mtime=1.0)


def batch_of(*paths: str, value: float = 1.0, h: str = "h") -> Batch:
    b = Batch()
    for p in paths:
        b.add_image(np.full(4, value, np.float32), **row(p, h))
    return b


def test_commit_publishes_parts_that_readers_see_before_consolidation(tmp_path: Path):
    store = tmp_path / "s.h5"
    with StoreWriter(store, root=str(tmp_path)) as w:
        w.commit(batch_of("a.png", "b.png"), "toy", ATTRS)
        w.commit(batch_of("c.png"), "toy", ATTRS)
        assert not store.exists() and len(list_parts(store)) == 2
        snap = open_store(store)  # a reader during the run: a consistent prefix
        assert snap.n_images == 3 and len(snap.space("toy")) == 3 and snap.journal_parts == 2
        w.consolidate()
    assert store.exists() and not journal_dir(store).exists()
    st = open_store(store)
    assert list(st.images["path"]) == ["a.png", "b.png", "c.png"]
    assert st.space("toy").vectors.dtype == np.float16
    with h5py.File(store) as f:
        ds = f["spaces/toy/vectors"]
        assert ds.chunks is not None and ds.maxshape == (None, 4)
        assert f["spaces/toy"].attrs["backbone"] == "toy"


def test_second_writer_is_refused_with_a_clear_message(tmp_path: Path):
    store = tmp_path / "s.h5"
    with StoreWriter(store):
        with pytest.raises(StoreLockedError, match="being written by pid"):
            StoreWriter(store).acquire()
    with StoreWriter(store):  # the lock is released on exit
        pass


def test_leftover_journal_is_recovered_by_the_next_writer(tmp_path: Path):
    store = tmp_path / "s.h5"
    w = StoreWriter(store, root=str(tmp_path))
    w.acquire()
    w.commit(batch_of("a.png"), "toy", ATTRS)
    w.release()  # as if killed: parts left, never consolidated
    assert list_parts(store) and not store.exists()
    with StoreWriter(store):
        pass
    assert store.exists() and not list_parts(store)
    assert open_store(store).n_images == 1


def test_parts_already_folded_in_are_not_counted_twice(tmp_path: Path):
    """Killed between the atomic replace and the deletion of the parts: no duplicates."""
    store = tmp_path / "s.h5"
    with StoreWriter(store) as w:
        w.commit(batch_of("a.png"), "toy", ATTRS)
        parts = [p.read_bytes() for _, p in list_parts(store)]
        w.consolidate()
    journal_dir(store).mkdir()
    (journal_dir(store) / "part-0000000001.h5").write_bytes(parts[0])
    st = open_store(store)
    assert st.n_images == 1 and len(st.space("toy")) == 1


def test_changed_content_replaces_the_vector(tmp_path: Path):
    store = tmp_path / "s.h5"
    with StoreWriter(store) as w:
        w.commit(batch_of("a.png", "b.png", value=1.0, h="old"), "toy", ATTRS)
        w.commit(batch_of("a.png", value=2.0, h="new"), "toy", ATTRS)
    st = open_store(store)
    sp = st.space("toy")
    assert st.n_images == 2 and len(sp) == 2
    assert sp.vectors[list(sp.paths).index("a.png")][0] == 2.0
    assert st.images["hash"][0] == "new"


def test_failure_is_cleared_when_the_file_later_embeds(tmp_path: Path):
    store = tmp_path / "s.h5"
    with StoreWriter(store) as w:
        b = Batch()
        b.add_failure(path="a.png", space="toy", error="OSError", message="truncated", size=3, mtime=1.0)
        w.commit(b, "toy", ATTRS)
        assert len(open_store(store).failures) == 1
        w.commit(batch_of("a.png"), "toy", ATTRS)
    assert open_store(store).failures == []


def test_space_with_other_weights_is_refused(tmp_path: Path):
    store = tmp_path / "s.h5"
    with pytest.raises(StoreError, match="--space"):
        with StoreWriter(store) as w:
            w.commit(batch_of("a.png"), "toy", ATTRS)
            w.commit(batch_of("b.png"), "toy", {**ATTRS, "weights_sha256": "other"})


def test_missing_store_names_the_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="embedstore embed"):
        open_store(tmp_path / "none.h5")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_corrupt_store_gives_a_clear_error(tmp_path: Path, damage: str):
    store = tmp_path / "s.h5"
    with StoreWriter(store) as w:
        w.commit(batch_of("a.png"), "toy", ATTRS)
    data = store.read_bytes()
    if damage == "truncate":
        store.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        store.write_bytes(b"not hdf5 at all" * 100)
    else:
        store.unlink()
        with h5py.File(store, "w") as f:
            f["x"] = 1
    with pytest.raises(StoreError, match=str(store)):
        open_store(store)


def test_unwritable_folder_is_a_clear_error(tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        import os

        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(StoreError, match="writable"):
            StoreWriter(folder / "s.h5").acquire()
    finally:
        folder.chmod(0o700)


def test_default_space_is_the_first_frozen_one(tmp_path: Path) -> None:
    """A fine-tuned space sorting before its parent does not become the default."""
    n = 6
    images = {"path": [f"img/{i}.png" for i in range(n)], "label": ["a", "b"] * 3, "split": ["train"] * n,
              "size": [1] * n, "hash": [f"{i:032x}" for i in range(n)], "mtime": [0.0] * n}
    frozen = {"backbone": "x", "weights_sha256": "f" * 64, "dim": 4, "dtype": "float16"}
    tuned = {**frozen, "weights_sha256": "e" * 64, "parent_space": "x"}
    vectors = np.eye(n, 4, dtype=np.float16) + np.float16(0.1)  # no all-zero row: a store refuses those
    path = tmp_path / "s.h5"
    write_file(path, {"root": str(tmp_path), "created": "now"}, images,
               {"a-ft": (tuned, np.arange(n), vectors), "x": (frozen, np.arange(n), vectors)},
               {c: [] for c in FAILURE_COLUMNS})
    st = open_store(path)
    assert list(st.spaces) == ["a-ft", "x"] and st.space().name == "x"
    assert st.space("a-ft").attrs["parent_space"] == "x"


@pytest.mark.parametrize("content", [b"not hdf5 at all" * 100, None], ids=["garbage", "missing"])
def test_adopting_a_damaged_or_missing_file_names_it(tmp_path: Path, content: bytes | None) -> None:
    """Merging a file that is not HDF5 is one clear error naming it; nothing joins the journal."""
    source = tmp_path / "shard.h5"
    if content is not None:
        source.write_bytes(content)
    store = tmp_path / "s.h5"
    with StoreWriter(store) as w:
        w.commit(batch_of("a.png"), "toy", ATTRS)
        expected = (StoreError, "not a readable embedstore file") if content else (FileNotFoundError, None)
        with pytest.raises(expected[0], match=expected[1]) as err:
            w.adopt(source)
        assert str(source) in str(err.value)
        assert len(list_parts(store)) == 1
    assert open_store(store).n_images == 1


def test_a_space_with_an_unknown_dtype_is_a_store_error(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    with StoreWriter(store) as w:
        with pytest.raises(StoreError, match="dtype 'float7'.*float16 or float32"):
            w.commit(batch_of("a.png"), "toy", {**ATTRS, "dtype": "float7"})
    assert not store.exists() and not list_parts(store)


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """write_file publishes whole files only: on ENOSPC a StoreError names the file, the old one stays."""
    n = 4
    images = {"path": [f"{i}.png" for i in range(n)], "label": ["a"] * n, "split": ["train"] * n,
              "size": [1] * n, "hash": ["h"] * n, "mtime": [0.0] * n}
    no_failures = {c: [] for c in FAILURE_COLUMNS}
    with tmpfs(tmp_path / "disk", "256k") as disk:
        path = disk / "s.h5"
        small = np.ones((n, 4), np.float16)
        write_file(path, {"root": ""}, images, {"toy": (ATTRS, np.arange(n), small)}, no_failures)
        before = path.read_bytes()
        big = np.ones((n, 64_000), np.float32)  # 1 MB: more than the disk holds
        with pytest.raises(StoreError, match=f"no space left to write {path}"):
            write_file(path, {"root": ""}, images, {"toy": ({**ATTRS, "dim": 64_000}, np.arange(n), big)}, no_failures)
        assert path.read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["s.h5"]


def test_a_fold_that_fits_on_the_disk_is_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold needs room for one new file of about the parts' size, not twice it (a 30M-row import
    whose journal left 41 GB free for a 36 GB store was refused: it asked for 68 GB)."""
    from embedstore.store import fold as fold_module

    monkeypatch.setattr(fold_module, "IN_MEMORY_MAX", 0)  # fold on disk, as a large store does
    with tmpfs(tmp_path / "disk", "10m") as disk:  # ~3.8 MB of parts, ~6 MB free: the old rule asked 7.6
        store = disk / "s.h5"
        vectors = np.random.default_rng(0).standard_normal((6000, 128)).astype(np.float32) + 3
        with StoreWriter(store, root=str(disk)) as w:  # three parts of ~1 MB, folded on release
            for i in range(3):
                w.commit_arrays("toy", {**ATTRS, "dim": 128, "dtype": "float32"}, vectors[i * 2000:(i + 1) * 2000],
                                [f"{i}-{j}.png" for j in range(2000)])
        assert not list_parts(store)
        st = open_store(store)
        assert st.n_images == 6000 and np.array_equal(st.space("toy").vectors[2000:2005], vectors[2000:2005])
