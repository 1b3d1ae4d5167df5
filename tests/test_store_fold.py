"""Folding the journal into the main file: the same content as reading main + journal, in format 2."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from embedstore.store import FORMAT, StoreWriter, journal_dir, open_store

DIM = 8


def _attrs(backbone: str) -> dict:
    return {"backbone": backbone, "weights_sha256": None, "dim": DIM, "dtype": "float16"}


def _vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, DIM)).astype(np.float32) + 0.1


def _content(path: Path) -> dict:
    """Everything a reader sees, keyed by path (independent of row and position order)."""
    with open_store(path) as st:
        out = {"n": st.n_images, "failures": sorted((f["path"], f["space"]) for f in st.failures)}
        images = {c: st.images[c] for c in ("path", "label", "split", "hash")}
        out["images"] = {p: tuple(images[c][i] for c in ("label", "split", "hash")) for i, p in enumerate(images["path"])}
        for name, sp in st.spaces.items():
            paths = sp.column("path")
            out[name] = {p: v.tobytes() for p, v in zip(paths, sp.vectors[:])}
            assert len(set(sp.rows.tolist())) == len(sp)
        return out


def _commit(w: StoreWriter, space: str, paths: list[str], vectors: np.ndarray, **kw) -> None:
    w.commit_arrays(space, _attrs(space), vectors, paths, **kw)


def test_fold_gives_what_the_journal_showed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = tmp_path / "s.h5"
    paths = [f"img/{i:03d}.png" for i in range(100)]
    with StoreWriter(store, root=str(tmp_path)) as w:
        _commit(w, "a", paths, _vectors(rng, 100), labels=["cat", "dog"] * 50, hashes=[f"h{i}" for i in range(100)])
        _commit(w, "b", paths[:50], _vectors(rng, 50), hashes=[f"h{i}" for i in range(50)])
    first = _content(store)
    assert first["n"] == 100 and len(first["a"]) == 100 and len(first["b"]) == 50
    with open_store(store) as st:
        uuid, generation = st.uuid, st.generation
        assert uuid and st.space("a").generation >= 1

    w = StoreWriter(store)
    w.acquire()
    try:
        # re-embedded rows (same content): overwritten in place; new rows; rows whose content changed
        _commit(w, "a", paths[:10], _vectors(rng, 10), labels=["cat"] * 10, hashes=[f"h{i}" for i in range(10)])
        new = [f"new/{i}.png" for i in range(20)]
        _commit(w, "a", new, _vectors(rng, 20), labels=["bird"] * 20, splits=["val"] * 20,
                hashes=[f"n{i}" for i in range(20)])
        _commit(w, "a", paths[40:45], _vectors(rng, 5), labels=["cat"] * 5, hashes=[f"changed{i}" for i in range(5)])
        bad = _vectors(rng, 1)
        bad[0, 0] = np.nan
        _commit(w, "b", ["new/0.png"], bad, hashes=["n0"])  # recorded as a failure, not stored
        journal = _content(store)  # main file + journal, as a reader sees it while the run goes on
    finally:
        w.consolidate()
        w.release()
    assert not journal_dir(store).exists()
    folded = _content(store)
    assert folded == journal
    assert folded["n"] == 120 and len(folded["a"]) == 120
    assert set(folded["b"]) == set(paths[:40]) | set(paths[45:50])  # changed content: b's old vectors are gone
    assert folded["images"]["new/3.png"] == ("bird", "val", "n3")
    assert ("new/0.png", "b") in folded["failures"]
    with open_store(store) as st:
        assert st.uuid == uuid and st.generation > generation and st.journal_parts == 0
        assert st.space("a").generation > 1 and set(st.space("a").versions.tolist()) != {0}
        codes, names = st.space("a").codes("label")
        assert sorted(names) == ["bird", "cat", "dog"] and (codes >= 0).all()
    with h5py.File(store) as f:
        assert f.attrs["format"] == FORMAT and f["images/label"].dtype == np.int32
        assert sorted(json.loads(f["images/label"].attrs["categories"])) == ["bird", "cat", "dog"]


def _format1(path: Path, n: int, rng: np.random.Generator) -> np.ndarray:
    """A store file as embedstore 0.x wrote it: string labels, no keys, no versions."""
    vectors = rng.standard_normal((n, DIM)).astype(np.float16)
    s = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "embedstore/1", "root": str(path.parent), "journal_seq": 3})
        g = f.create_group("images")
        g["path"] = np.array([f"p{i}.png" for i in range(n)], dtype=s)
        g["label"] = np.array(["x" if i % 2 else "" for i in range(n)], dtype=s)
        g["split"] = np.array(["train"] * n, dtype=s)
        g["size"] = np.arange(n, dtype=np.int64)
        g["hash"] = np.array([f"h{i}" for i in range(n)], dtype=s)
        g["mtime"] = np.zeros(n)
        fg = f.create_group("failures")
        for c in ("path", "space", "error", "message"):
            fg.create_dataset(c, shape=(0,), dtype=s, maxshape=(None,))
        fg.create_dataset("size", shape=(0,), dtype=np.int64, maxshape=(None,))
        fg.create_dataset("mtime", shape=(0,), dtype=np.float64, maxshape=(None,))
        sp = f.create_group("spaces").create_group("old")
        sp["vectors"], sp["rows"] = vectors, np.arange(n)
        sp.attrs.update({"backbone": "old", "dim": DIM})
    return vectors


def test_a_format_1_store_reads_and_is_rewritten_as_format_2_on_the_next_fold(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    store = tmp_path / "old.h5"
    vectors = _format1(store, 30, rng)
    with open_store(store) as st:
        sp = st.space()
        assert np.array_equal(sp.vectors[:], vectors) and sp.generation == 3 and st.uuid == ""
        assert list(sp.column("label", [0, 1])) == ["", "x"]
        assert st.rows_of(["p7.png", "nope.png"]).tolist() == [7, -1]
    before = _content(store)
    with StoreWriter(store) as w:
        w.commit_arrays("old", {"backbone": "old", "dim": DIM, "dtype": "float16"}, _vectors(rng, 2),
                        ["q0.png", "q1.png"])
    after = _content(store)
    assert after["old"] == {**before["old"], **{k: v for k, v in after["old"].items() if k.startswith("q")}}
    assert after["n"] == 32
    with h5py.File(store) as f:
        assert f.attrs["format"] == FORMAT and "key" in f["images"] and "version" in f["spaces/old"]
    with open_store(store) as st:
        assert st.uuid and st.space().generation == 4


def test_other_lineage_in_a_space_is_refused_when_folding(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    store = tmp_path / "s.h5"
    with StoreWriter(store) as w:
        _commit(w, "a", ["x.png"], _vectors(rng, 1))
    with pytest.raises(Exception, match="choose another space name"):
        with StoreWriter(store) as w:
            w.commit_arrays("a", {**_attrs("a"), "backbone": "other"}, _vectors(rng, 1), ["y.png"])
    assert _content(store)["n"] in (1, 2)  # whatever was refused, the main file is whole and readable
