"""Commands that could destroy or escape a store are refused before anything is written."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import embedstore
from embedstore.errors import InvalidNameError
from embedstore.store import validate_space_name
from embedstore_cli.main import main
from imagegen import TINY_BACKBONE, make_collection


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pristine")
    src = make_collection(folder / "images")
    store = folder / "m.h5"
    embedstore.embed(src, store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    return store


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "m.h5"
    shutil.copyfile(pristine, copy)
    return copy


def _refused(args: list[str], cwd: Path | None = None) -> str:
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        res = CliRunner().invoke(main, args)
    finally:
        os.chdir(old)
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


@pytest.mark.parametrize("spelling", ["same", "dot-slash", "symlink", "journal"])
def test_merge_of_a_store_into_itself_is_refused_and_changes_nothing(store: Path, spelling: str) -> None:
    before = store.read_bytes()
    if spelling == "same":
        source, cwd = str(store), None
    elif spelling == "dot-slash":
        source, cwd = "./m.h5", store.parent
    elif spelling == "symlink":
        (store.parent / "link.h5").symlink_to(store)
        source, cwd = str(store.parent / "link.h5"), None
    else:
        journal = Path(f"{store}.journal")
        journal.mkdir()
        shutil.copyfile(store, journal / "part-0000000001.h5")
        source, cwd = str(journal / "part-0000000001.h5"), None
    line = _refused(["merge", "m.h5" if cwd else str(store), source], cwd=cwd)
    assert "itself or part of it" in line and "nothing was changed" in line
    assert store.read_bytes() == before and (Path(cwd, source) if cwd else Path(source)).exists()


def test_merge_refuses_a_source_listed_twice(store: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    shutil.copyfile(store, other)
    target = tmp_path / "new.h5"
    line = _refused(["merge", str(target), str(other), str(tmp_path / "." / "other.h5")])
    assert "listed twice" in line
    assert not target.exists() and other.exists()


def test_embed_with_a_path_as_space_name_writes_nothing(tmp_path: Path) -> None:
    src = make_collection(tmp_path / "images", per_class=1, splits=())
    target = tmp_path / "s.h5"
    line = _refused(["embed", str(src), "--store", str(target), "--space", "evil/sub", "--backbone", TINY_BACKBONE,
                     "--weights", "random", "--workers", "0", "--quiet"])
    assert "invalid space name 'evil/sub'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


@pytest.mark.parametrize("name", ["../x", "../../../x", "/tmp/abs", "..", "a/b", "", "x" * 129, "sp ace"])
def test_finetune_out_space_outside_its_folder_is_refused(store: Path, name: str) -> None:
    outside = Path("/tmp/abs").exists()
    line = _refused(["finetune", str(store), "--out-space", name, "--epochs", "1", "--workers", "0", "--quiet"])
    assert "invalid space name" in line
    assert sorted(p.name for p in store.parent.iterdir()) == ["m.h5"]  # no checkpoint folder anywhere
    assert Path("/tmp/abs").exists() == outside


def test_finetune_negative_seed_is_a_clean_usage_error(store: Path) -> None:
    res = CliRunner().invoke(main, ["finetune", str(store), "--seed", "-1", "--epochs", "1", "--quiet"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Invalid value for '--seed'" in res.output and "x>=0" in res.output
    assert sorted(p.name for p in store.parent.iterdir()) == ["m.h5"]


def test_finetune_library_refuses_negative_seed_and_bad_names(store: Path) -> None:
    from embedstore.finetuning import finetune

    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        finetune(store, seed=-1, epochs=1, workers=0, progress=False)
    with pytest.raises(InvalidNameError):
        finetune(store, out_space="../x", epochs=1, workers=0, progress=False)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0-random", "vit.b+16", "a-ft"])
def test_valid_space_names_pass(name: str) -> None:
    assert validate_space_name(name) == name


@pytest.mark.parametrize("name", ["evil/sub", ".", "..", "", "a\\b", "x" * 129, "naïve", None, 3])
def test_invalid_space_names_are_refused(name: object) -> None:
    with pytest.raises(InvalidNameError, match="invalid space name"):
        validate_space_name(name)
