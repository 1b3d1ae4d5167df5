"""Positions without reading ``rows``: a space whose position p holds image row p says so (an
attribute of its rows dataset, kept by the fold), and row -> position lookups then read nothing.
Whatever the attribute says, lookups must equal the brute-force answer from the rows themselves."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from embedstore.store import StoreWriter, open_store
from embedstore.store.format import IDENTITY

ATTRS = {"dim": 8, "dtype": "float16", "backbone": "synthetic", "weights_sha256": None}


def _commit(store: Path, space: str, paths: list[str], seed: int, hashes: list[str] | None = None) -> None:
    vectors = (np.random.default_rng(seed).standard_normal((len(paths), 8)) + 3).astype(np.float16)
    with StoreWriter(store, root=str(store.parent)) as w:
        w.commit_arrays(space, {**ATTRS, "backbone": space}, vectors, paths, hashes=hashes)


def _flag(store: Path, space: str) -> bool:
    with h5py.File(store, "r") as f:
        return bool(f[f"spaces/{space}/rows"].attrs[IDENTITY])


def _check_lookups(store: Path, space: str) -> None:
    with open_store(store) as st:
        sp = st.space(space)
        rows = np.asarray(sp.rows)
        asked = np.arange(-2, st.n_images + 2)
        truth = np.array([int(np.flatnonzero(rows == r)[0]) if r in rows else -1 for r in asked])
        assert np.array_equal(sp.positions_of(asked), truth)
        at = truth[truth >= 0]
        assert list(sp.column("path", at)) == list(st.image_column("path", rows[at]))
        for c in ("label", "split"):  # codes per position, read whole or through the row ids
            codes, names = sp.codes(c)
            by_row, row_names = st.image_codes(c, rows)
            assert names == row_names and np.array_equal(codes, by_row)


def test_identity_is_kept_while_true_and_dropped_when_a_vector_moves(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    paths = [f"img/{i}.jpg" for i in range(12)]
    _commit(store, "a", paths, 0, hashes=["h0"] * 12)
    _commit(store, "a", paths[3:6] + [f"img/new{i}.jpg" for i in range(3)], 1, hashes=["h0"] * 6)  # overwrite + append
    assert _flag(store, "a")
    _check_lookups(store, "a")

    _commit(store, "b", paths[8:10], 2, hashes=["h0", "h0"])  # a space of other rows: positions are not rows
    assert not _flag(store, "b")
    _check_lookups(store, "b")

    _commit(store, "b", paths[4:5], 3, hashes=["changed"])  # image 4 changed: its vector in "a" is removed
    assert not _flag(store, "a")  # the last vector moved into its hole
    _check_lookups(store, "a")
    with open_store(store) as st:
        assert st.space("a").positions_of(np.array([4]))[0] == -1


def test_a_file_without_the_attribute_is_checked_once_by_the_next_fold(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    paths = [f"img/{i}.jpg" for i in range(10)]
    _commit(store, "a", paths, 0)
    with h5py.File(store, "r+") as f:  # as written before the attribute existed
        del f["spaces/a/rows"].attrs[IDENTITY]
    _check_lookups(store, "a")
    _commit(store, "a", ["img/10.jpg"], 1)
    assert _flag(store, "a")
    _check_lookups(store, "a")


def test_a_few_paths_are_found_by_a_chunked_scan_even_past_a_key_collision(tmp_path: Path) -> None:
    """rows_of for a few paths scans the key column chunk by chunk (70,000 rows: two chunks); a key
    shared by two paths is resolved by the stored path, also when the wrong row comes first."""
    from embedstore.store.keys import path_keys

    store = tmp_path / "s.h5"
    paths = [f"img/{i:06d}.jpg" for i in range(70_000)]
    _commit(store, "a", paths, 0)
    with open_store(store) as st:
        assert st.rows_of([paths[3], paths[69_999], "img/none.jpg", paths[65_536]]).tolist() == [3, 69_999, -1, 65_536]
    with h5py.File(store, "r+") as f:  # row 10 now carries the key of row 66,000's path
        f["images/key"][10] = path_keys([paths[66_000]])[0]
    with open_store(store) as st:
        assert st.rows_of([paths[66_000]]).tolist() == [66_000]
