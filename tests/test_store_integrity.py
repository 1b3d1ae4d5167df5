"""Damaged stores are refused with one line naming the file and dataset; bad vectors are never stored.

Damage to the header (shapes, types, attributes) is refused at open, by every command. Damage to
the content of rows or vectors is refused by every command that reads them; ``info`` reads neither
(opening a store costs its header, not its size), so it still describes such a store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import embedstore
from embedstore.errors import StoreError
from embedstore.store import Batch, StoreWriter, open_store
from embedstore_cli.main import main


@pytest.fixture
def pristine(session_tiny_store: tuple[Path, Path]) -> Path:
    """The session's tiny store, read only."""
    return session_tiny_store[1]


@pytest.fixture
def store(tiny_store: Path) -> Path:
    """This test's own copy, to damage."""
    return tiny_store


def _replace(group: h5py.Group, name: str, data: np.ndarray) -> None:
    del group[name]
    group.create_dataset(name, data=data)


def _space(f: h5py.File) -> h5py.Group:
    return f["spaces"][next(iter(f["spaces"]))]


def short_rows(f: h5py.File) -> None:
    g = _space(f)
    _replace(g, "rows", g["rows"][()][:-2])


def row_out_of_range(f: h5py.File) -> None:
    g = _space(f)
    rows = g["rows"][()]
    rows[0] = len(f["images/path"]) + 5
    _replace(g, "rows", rows)


def duplicated_row(f: h5py.File) -> None:
    g = _space(f)
    rows = g["rows"][()]
    rows[1] = rows[0]
    _replace(g, "rows", rows)


def negative_row(f: h5py.File) -> None:
    g = _space(f)
    rows = g["rows"][()]
    rows[0] = -1
    _replace(g, "rows", rows)


def flat_vectors(f: h5py.File) -> None:
    g = _space(f)
    _replace(g, "vectors", g["vectors"][()][:, 0])


def string_vectors(f: h5py.File) -> None:
    g = _space(f)
    n = len(g["rows"])
    _replace(g, "vectors", np.array([f"v{i}" for i in range(n)], dtype=h5py.string_dtype()))


def short_label_column(f: h5py.File) -> None:
    _replace(f["images"], "label", f["images/label"][()][:-1])


def text_journal_seq(f: h5py.File) -> None:
    f.attrs["journal_seq"] = "abc"


def nan_vector(f: h5py.File) -> None:
    v = _space(f)["vectors"]
    row = v[0]
    row[3] = np.nan
    v[0] = row


def zero_vector(f: h5py.File) -> None:
    v = _space(f)["vectors"]
    v[2] = np.zeros(v.shape[1], v.dtype)


CASES: list[tuple[Callable[[h5py.File], None], str]] = [
    (short_rows, r"spaces/\S+/rows has \d+ entries but spaces/\S+/vectors has \d+ rows"),
    (row_out_of_range, r"spaces/\S+/rows holds row ids from \d+ to \d+, outside the images table"),
    (duplicated_row, r"spaces/\S+/rows holds 1 row id\(s\) more than once"),
    (negative_row, r"spaces/\S+/rows holds row ids from -1 to"),
    (flat_vectors, r"spaces/\S+/vectors is float16 of shape \(\d+,\), not a 2-D float array"),
    (string_vectors, r"spaces/\S+/vectors is object of shape .* not a 2-D float array"),
    (short_label_column, r"the images columns have different lengths .*images/label has"),
    (text_journal_seq, r"attribute journal_seq is 'abc', not a non-negative integer"),
    (nan_vector, r"spaces/\S+/vectors has 1 vector\(s\) with NaN/Inf values or all zeros \(e.g. row 0\)"),
    (zero_vector, r"spaces/\S+/vectors has 1 vector\(s\) with NaN/Inf values or all zeros"),
]
CONTENT = {row_out_of_range, duplicated_row, negative_row, nan_vector, zero_vector}  # found when read
COMMANDS = [["info"], ["search", "--row", "0"], ["classify", "--models", "centroid"], ["index"], ["duplicates"]]


@pytest.mark.parametrize("damage,message", CASES, ids=[c[0].__name__ for c in CASES])
def test_damaged_store_is_refused_by_every_command(store: Path, damage: Callable, message: str) -> None:
    with h5py.File(store, "r+") as f:
        damage(f)
    before = store.read_bytes()
    commands = COMMANDS
    if damage in CONTENT:
        with open_store(store) as st:  # the header is sound: opening reads no rows or vectors
            with pytest.raises(StoreError, match=message):
                st.space().rows, st.space().vectors[:]
        info = CliRunner().invoke(main, ["info", str(store)])
        assert info.exit_code == 0, info.output
        commands = COMMANDS[1:]
    else:
        with pytest.raises(StoreError, match=message):
            open_store(store)
    for command in commands:
        res = CliRunner().invoke(main, [command[0], str(store), *command[1:]])
        assert res.exit_code == 1, (command, res.output)
        assert isinstance(res.exception, SystemExit), (command, res.exception)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"Error: {store}: "), (command, res.output)
        assert "the file is damaged" in lines[0] and "Traceback" not in res.output
        import re

        assert re.search(message, lines[0]), (command, lines[0])
    assert store.read_bytes() == before  # nothing was written over the damaged file


def test_pristine_store_opens(pristine: Path) -> None:
    st = open_store(pristine)
    assert st.n_images > 0 and len(st.space()) == st.n_images


ATTRS = {"backbone": "toy", "weights_sha256": "0" * 64, "dim": 4}


def _row(name: str) -> dict:
    return dict(path=name, label="a", split="train", size=10, hash="h" + name, mtime=1.0)


def test_nan_inf_zero_and_overflowing_vectors_become_failures(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    batch = Batch()
    batch.add_image(np.ones(4, np.float32), **_row("good.png"))
    batch.add_image(np.array([1, np.nan, 0, 0], np.float32), **_row("nan.png"))
    batch.add_image(np.array([1, np.inf, 0, 0], np.float32), **_row("inf.png"))
    batch.add_image(np.zeros(4, np.float32), **_row("zero.png"))
    batch.add_image(np.array([1e6, 0, 0, 0], np.float32), **_row("huge.png"))  # Inf once cast to float16
    with StoreWriter(store, root=str(tmp_path)) as w:
        w.commit(batch, "toy", ATTRS)
    st = open_store(store)  # the store stays readable: the bad vectors were never written
    assert list(st.space("toy").paths) == ["good.png"]
    failed = {f["path"]: f for f in st.failures}
    assert sorted(failed) == ["huge.png", "inf.png", "nan.png", "zero.png"]
    assert {f["error"] for f in failed.values()} == {"BadVector"} and {f["space"] for f in failed.values()} == {"toy"}
    assert "NaN or Inf" in failed["nan.png"]["message"] and "all zeros" in failed["zero.png"]["message"]
    assert failed["nan.png"]["size"] == 10 and failed["nan.png"]["mtime"] == 1.0


def test_repr_is_a_short_summary(pristine: Path) -> None:
    st = open_store(pristine)
    sp = st.space()
    text = repr(st)
    assert len(text) < 600 and len(text.splitlines()) <= 4
    assert str(pristine) in text and f"{st.n_images} images" in text and "0 failures" in text
    assert f"{sp.name}: {len(sp)} x {sp.dim}" in text
    assert repr(sp).startswith(f"<Space {sp.name!r}: {len(sp)} vectors of dim {sp.dim}") and len(repr(sp)) < 200


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_vector_checks_on_the_bits_agree_with_numpy(dtype) -> None:
    """The NaN/Inf/zero test reads IEEE bits (fast on float16); it must say what numpy says."""
    from embedstore.store.integrity import _finite_nonzero, vector_problems

    x = np.random.default_rng(0).standard_normal((64, 16)).astype(dtype)
    x[3, 2], x[7, 1], x[9, 0], x[12, 4] = np.nan, np.inf, -np.inf, -np.nan
    x[5], x[11] = 0, -0.0
    x[13] = 0
    x[13, 15] = np.finfo(dtype).smallest_subnormal  # tiny, but a direction
    finite, nonzero = _finite_nonzero(x)
    assert np.array_equal(finite, np.isfinite(x).all(axis=1)) and np.array_equal(nonzero, x.any(axis=1))
    assert sorted(vector_problems(x)) == [3, 5, 7, 9, 11, 12]
