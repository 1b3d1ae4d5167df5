"""Shared fixtures: generated image collections and tiny stores built with real code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagegen import SHARED, TINY_BACKBONE, make_collection  # noqa: F401 (re-exported)


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    """A small train/val collection of generated PNG images (3 classes)."""
    return make_collection(tmp_path / "images")


@pytest.fixture
def tiny_store(tmp_path: Path, collection: Path) -> Path:
    """A store of the generated collection, embedded with timm's tiny random network."""
    import embedstore

    store = tmp_path / "tiny.h5"
    embedstore.embed(collection, store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
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
