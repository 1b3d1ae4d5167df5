"""`info`'s counts (labels, splits, absolute paths) are tallies kept in the main file: they must equal
what the columns hold after every kind of write, before and after the journal is folded, and a
file written without them is counted from its columns and given them by the next write."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from embedstore.store import StoreWriter, open_store
from embedstore.store import tallies

ATTRS = {"dim": 8, "dtype": "float16", "backbone": "synthetic", "weights_sha256": None}


def _vectors(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 8)) + 3).astype(np.float16)


def _truth(path: Path) -> dict:
    """The counts read from the columns themselves, row by row."""
    with open_store(path) as st:
        cols = {c: st.image_column(c).tolist() for c in ("label", "split", "path")}
    return {"labels": dict(sorted(Counter(v for v in cols["label"] if v).items())),
            "splits": dict(sorted(Counter(v for v in cols["split"] if v).items())),
            "absolute_paths": sum(p.startswith("/") for p in cols["path"])}


def _shown(path: Path) -> dict:
    with open_store(path) as st:
        s = st.summary()
    return {k: s[k] for k in ("labels", "splits", "absolute_paths")}


def _write(path: Path, paths: list[str], seed: int, **columns) -> None:
    with StoreWriter(path, root=str(path.parent)) as w:
        w.commit_arrays("s", ATTRS, _vectors(len(paths), seed), paths, **columns)


def test_counts_follow_relabels_new_rows_and_kept_columns(tmp_path: Path) -> None:
    store = tmp_path / "t.h5"
    paths = [f"img/{i:03d}.jpg" for i in range(60)] + ["/elsewhere/a.jpg", "/elsewhere/b.jpg"]
    labels = [["cat", "dog", None][i % 3] for i in range(len(paths))]
    _write(store, paths, 0, labels=labels, splits=["train" if i % 4 else "val" for i in range(len(paths))])
    assert _shown(store) == _truth(store)
    assert _shown(store)["absolute_paths"] == 2 and _shown(store)["labels"] == {"cat": 21, "dog": 21}

    # relabel some existing rows, add new ones (one absolute), keep splits as stored
    more = paths[:10] + [f"img/new{i}.jpg" for i in range(5)] + ["/elsewhere/c.jpg"]
    _write(store, more, 1, labels=["bird"] * len(more))
    assert _shown(store) == _truth(store)
    assert _shown(store)["labels"]["bird"] == 16 and _shown(store)["absolute_paths"] == 3

    # vectors only: every column kept as stored, counts unchanged
    before = _shown(store)
    _write(store, paths[20:30], 2)
    assert _shown(store) == _truth(store) == before


def test_journal_parts_not_yet_folded_are_counted(tmp_path: Path) -> None:
    store = tmp_path / "t.h5"
    _write(store, [f"a{i}.jpg" for i in range(20)], 0, labels=["x"] * 20)
    w = StoreWriter(store, root=str(tmp_path))
    w.acquire()
    try:  # a run in progress: published parts, no fold yet
        w.commit_arrays("s", ATTRS, _vectors(8, 3), [f"a{i}.jpg" for i in range(4)] + ["/abs/1.jpg", "b.jpg", "c.jpg", "d.jpg"],
                        labels=["y"] * 8)
        with open_store(store) as st:
            assert st.journal_parts == 1
        assert _shown(store) == _truth(store)
        assert _shown(store)["labels"] == {"x": 16, "y": 8} and _shown(store)["absolute_paths"] == 1
    finally:
        w.release()
    assert _shown(store) == _truth(store)


def test_a_file_without_tallies_is_counted_and_given_them_by_the_next_write(tmp_path: Path) -> None:
    store = tmp_path / "t.h5"
    _write(store, [f"a{i}.jpg" for i in range(30)] + ["/abs/x.jpg"], 0, labels=["p", "q", "r"] * 10 + ["p"])
    with h5py.File(store, "r+") as f:  # as written before tallies existed
        del f["images"].attrs[tallies.ATTR]
    assert _shown(store) == _truth(store)
    _write(store, ["new.jpg"], 1, labels=["q"])
    with h5py.File(store, "r") as f:
        assert tallies.read(f["images"]) is not None
    assert _shown(store) == _truth(store)
    assert _shown(store)["labels"] == {"p": 11, "q": 11, "r": 10}
