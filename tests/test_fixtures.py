"""The session-built ``tiny_store`` a test gets (tests/conftest.py) is what embedding its own
``collection`` would have written, so reusing one build never changes what a test sees."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

import embedstore
from imagegen import TINY_BACKBONE


def contents(path: Path) -> dict:
    """Every dataset and attribute of a store file, timestamps and the store's identity left out."""
    out: dict = {}
    with h5py.File(path, "r") as f:
        out["/"] = {k: v for k, v in f.attrs.items() if k not in ("created", "uuid")}

        def visit(name: str, obj: h5py.HLObject) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
            out[name + "@attrs"] = {k: v for k, v in obj.attrs.items() if k != "created"}

        f.visititems(visit)
    return out


def test_tiny_store_equals_embedding_the_tests_own_collection(tiny_store: Path, collection: Path, tmp_path: Path):
    direct = tmp_path / "direct.h5"
    embedstore.embed(collection, direct, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    a, b = contents(tiny_store), contents(direct)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
        else:
            assert str(a[key]) == str(b[key]), (key, a[key], b[key])
    assert embedstore.open_store(tiny_store).root == str(collection.resolve())
    again = embedstore.embed(collection, tiny_store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    assert again["embedded"] == 0  # the copied images keep their times: nothing looks changed
