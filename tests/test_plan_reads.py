"""Planning reads a store's rows, never its vectors: measured as bytes read (/proc/self/io rchar)."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import embedstore
from embedstore.errors import StoreError
from embedstore.pipeline.plan import plan_view
from embedstore.store import FAILURE_COLUMNS, StoreWriter, open_store, write_file
from embedstore.store.format import part_path
from imagegen import TINY_BACKBONE

IO = Path("/proc/self/io")
pytestmark = pytest.mark.skipif(not IO.exists(), reason="needs Linux /proc/self/io")
BIG = "zz-big"  # sorts after the tiny backbone's space: the default space stays the same


def _rchar() -> int:
    for line in IO.read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _bytes_read(fn):
    before = _rchar()
    out = fn()
    return out, _rchar() - before


@pytest.fixture
def big_store(tiny_store: Path) -> tuple[Path, int]:
    """``tiny_store`` plus a space of ~50 MB of synthetic float16 vectors, written by the store's own
    ``write_file``, and one journal part adding an image to that space; returns (store, vector bytes)."""
    st = open_store(tiny_store)
    with h5py.File(tiny_store, "r") as f:
        attrs = {k: v for k, v in f.attrs.items() if k != "format"}
    n = st.n_images
    dim = (50 << 20) // (2 * n)
    rng = np.random.default_rng(0)
    big = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    spaces = {name: (sp.attrs, sp.rows, sp.vectors) for name, sp in st.spaces.items()}
    spaces[BIG] = ({"backbone": "synthetic", "dim": dim, "dtype": "float16"}, np.arange(n), big)
    write_file(tiny_store, attrs={**attrs, "journal_seq": 0}, images=st.images, spaces=spaces,
               failures={c: [f[c] for f in st.failures] for c in FAILURE_COLUMNS})
    extra = {"path": ["extra/never-on-disk.png"], "label": ["x"], "split": ["train"], "size": [1],
             "hash": ["0" * 32], "mtime": [1.0]}
    part_path(tiny_store, 1).parent.mkdir()
    write_file(part_path(tiny_store, 1), attrs={"root": attrs["root"]}, images=extra,
               spaces={BIG: ({"backbone": "synthetic", "dim": dim, "dtype": "float16"}, np.arange(1),
                             rng.standard_normal((1, dim), dtype=np.float32).astype(np.float16))},
               failures={c: [] for c in FAILURE_COLUMNS})
    return tiny_store, big.nbytes


def test_plan_view_reads_rows_not_vectors(big_store: tuple[Path, int]) -> None:
    store, nbytes = big_store
    view, planned = _bytes_read(lambda: plan_view(store))
    full, opened = _bytes_read(lambda: open_store(store))
    assert opened > nbytes  # a reader does read (and scan) every vector
    assert planned < nbytes / 20, (planned, nbytes)
    # the view holds what planning needs, main file and journal part alike
    assert view.n_images == full.n_images == open_store(store, vectors=False).n_images
    assert view.journal_parts == full.journal_parts == 1
    assert set(view.spaces) == set(full.spaces)
    for name, sp in full.spaces.items():
        assert np.array_equal(view.spaces[name].rows, sp.rows) and view.spaces[name].attrs == sp.attrs
        assert view.spaces[name].vectors.shape == (len(sp), 0)
        assert view.spaces[name].vectors.dtype == sp.vectors.dtype
    assert list(view.images["path"]) == list(full.images["path"])
    for writer_vectors, expect_more in ((False, False), (True, True)):
        with StoreWriter(store) as writer:  # acquire folds in the journal part (reads vectors once)
            snap, n = _bytes_read(lambda: writer.snapshot(vectors=writer_vectors))
            assert (n > nbytes) is expect_more, (writer_vectors, n, nbytes)
            assert snap.n_images == full.n_images


def test_rerun_with_nothing_new_reads_no_vectors(big_store: tuple[Path, int], collection: Path) -> None:
    store, nbytes = big_store
    with StoreWriter(store):  # fold the journal part in first, so the rerun below has nothing to consolidate
        pass
    before = open_store(store)
    res, n = _bytes_read(lambda: embedstore.embed(collection, store, backbone=TINY_BACKBONE, weights="random",
                                                  workers=0, progress=False))
    assert res["embedded"] == 0 and res["failed"] == 0 and res["unchanged"] == len(before.space()), res
    assert n < nbytes / 20, (n, nbytes)
    after = open_store(store)
    assert after.n_images == before.n_images
    for name, sp in before.spaces.items():
        assert np.array_equal(after.spaces[name].rows, sp.rows)
        assert np.array_equal(after.spaces[name].vectors, sp.vectors)


def test_rows_only_read_keeps_structural_checks_and_leaves_the_scan_to_readers(tiny_store: Path) -> None:
    with h5py.File(tiny_store, "r+") as f:
        g = f["spaces"][next(iter(f["spaces"]))]
        v = g["vectors"]
        row = v[0]
        row[0] = np.nan
        v[0] = row
    assert plan_view(tiny_store) is not None  # no vector read, so no NaN seen while planning
    with pytest.raises(StoreError, match="NaN/Inf"):
        open_store(tiny_store)  # every reader still refuses it
    with h5py.File(tiny_store, "r+") as f:
        g = f["spaces"][next(iter(f["spaces"]))]
        rows = g["rows"][()][:-2]
        del g["rows"]
        g.create_dataset("rows", data=rows)
    with pytest.raises(StoreError, match=r"rows has \d+ entries but spaces/\S+/vectors has \d+ rows"):
        plan_view(tiny_store)
    with h5py.File(tiny_store, "r+") as f:
        f.attrs["journal_seq"] = "abc"
    with pytest.raises(StoreError, match="attribute journal_seq is 'abc'"):
        plan_view(tiny_store)


def test_plan_view_of_no_store_is_none(tmp_path: Path) -> None:
    assert plan_view(tmp_path / "absent.h5") is None
