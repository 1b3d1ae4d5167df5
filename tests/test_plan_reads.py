"""Opening a store reads its header, not its vectors; reads cost the rows they touch (/proc/self/io rchar)."""
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
    spaces = {name: (sp.attrs, sp.rows, sp.vectors[:]) for name, sp in st.spaces.items()}
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


def test_opening_reads_the_header_and_reads_cost_the_rows_touched(big_store: tuple[Path, int]) -> None:
    store, nbytes = big_store
    view, planned = _bytes_read(lambda: plan_view(store))
    full, opened = _bytes_read(lambda: open_store(store))
    assert planned < nbytes / 20 and opened < nbytes / 20, (planned, opened, nbytes)
    assert view.n_images == full.n_images and view.journal_parts == full.journal_parts == 1
    sp = full.space(BIG)
    dim = sp.dim
    few, n_few = _bytes_read(lambda: sp.vectors[[3, 1, len(sp) - 1]])  # two from the main file, one from the part
    assert few.shape == (3, dim) and few.dtype == np.float16
    assert n_few < 3 * dim * 2 + (1 << 20), (n_few, dim)  # those rows, not the other ones
    whole, n_whole = _bytes_read(lambda: sp.vectors[:])
    assert n_whole > nbytes * 0.9 and whole.shape == (len(sp), dim)
    assert np.array_equal(few, whole[[3, 1, len(sp) - 1]])
    labels, n_labels = _bytes_read(lambda: sp.column("label", [0, 1]))
    assert n_labels < nbytes / 20 and list(labels) == list(full.images["label"][sp.rows[[0, 1]]])
    with StoreWriter(store) as writer:  # acquire folds the journal part in
        snap, n = _bytes_read(lambda: writer.snapshot())
        assert n < nbytes / 20 and snap.n_images == full.n_images and snap.journal_parts == 0
        assert np.array_equal(snap.space(BIG).vectors[:], whole)


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


def test_header_checks_at_open_and_the_vector_scan_when_read(tiny_store: Path) -> None:
    with h5py.File(tiny_store, "r+") as f:
        g = f["spaces"][next(iter(f["spaces"]))]
        v = g["vectors"]
        row = v[0]
        row[0] = np.nan
        v[0] = row
    assert plan_view(tiny_store) is not None  # no vector read, so no NaN seen while planning
    st = open_store(tiny_store)
    assert st.space().vectors[1:3].shape[0] == 2  # rows without the damage read fine
    with pytest.raises(StoreError, match="NaN/Inf"):
        st.space().vectors[0:2]  # a read that touches the damaged row is refused
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
