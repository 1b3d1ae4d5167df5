"""Shared fixtures: generated image collections and tiny stores built with real code."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from imagegen import SHARED, TINY_BACKBONE, make_collection  # noqa: F401 (re-exported)

CACHE_ENV = "EMBEDSTORE_CACHE"  # embedstore.embedding.onnx.CACHE_ENV (not imported here: no torch)


@pytest.fixture(scope="session", autouse=True)
def _runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The exported-runtime cache (ONNX exports, validations, auto's probes) of this test session, not
    the user's: a probe on record there would change which runtime ``auto`` picks in other tests."""
    folder = tmp_path_factory.mktemp("runtime-cache")
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(scope="session")
def session_tiny_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(collection, store) built once per session by the real code. Never change them: the
    ``collection`` and ``tiny_store`` fixtures hand each test its own copy."""
    import embedstore

    base = tmp_path_factory.mktemp("session-tiny")
    images = make_collection(base / "images")
    store = base / "tiny.h5"
    embedstore.embed(images, store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    return images, store


@pytest.fixture
def collection(tmp_path: Path, session_tiny_store: tuple[Path, Path]) -> Path:
    """A small train/val collection of generated PNG images (3 classes): make_collection's files,
    copied with their modification times from the session's."""
    return Path(shutil.copytree(session_tiny_store[0], tmp_path / "images"))


@pytest.fixture
def tiny_store(tmp_path: Path, collection: Path, session_tiny_store: tuple[Path, Path]) -> Path:
    """A store of ``collection``, embedded with timm's tiny random network: the session's store,
    rewritten (with the store's own writer) to name this test's copy of the images as its root.
    Same rows, vectors and attributes as embedding ``collection`` here, in a fraction of the time."""
    import h5py

    from embedstore.store import FAILURE_COLUMNS, open_store, write_file

    images, built = session_tiny_store
    st = open_store(built)
    assert st.root == str(images.resolve()) and not st.failures and not st.journal_parts, st.root
    with h5py.File(built, "r") as f:
        attrs = {k: v for k, v in f.attrs.items() if k != "format"}  # root, created, journal_seq
    store = tmp_path / "tiny.h5"
    write_file(store, attrs={**attrs, "root": str(collection.resolve())}, images=st.images,
               spaces={name: (sp.attrs, sp.rows, sp.vectors) for name, sp in st.spaces.items()},
               failures={c: [] for c in FAILURE_COLUMNS})
    return store


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where tests keep what a person may want to look at (screenshots, executed notebooks):
    $EMBEDSTORE_ARTIFACTS, else test-artifacts/ in the repository (ignored by git)."""
    folder = Path(os.environ.get("EMBEDSTORE_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    path = SHARED / "hymenoptera"
    if not path.is_dir():
        pytest.skip("../shared/datasets/hymenoptera is absent")
    return path


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
