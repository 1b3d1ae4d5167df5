"""One name for each CLI helper (``friendly``, ``emit_json``) and one ``expand_images`` for the
image arguments of ``search --image`` and ``predict``."""
from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from embedstore.data.collection import ImageItem, expand_images
from embedstore.errors import CollectionError, MissingImageError
from imagegen import make_collection


def test_one_error_decorator_and_one_json_printer() -> None:
    import embedstore_cli.friendly as friendly_module
    from embedstore_cli import classify_commands, finetune_commands, main, report_commands, scale_commands
    from embedstore_cli import search_commands

    assert not hasattr(friendly_module, "friendly_errors")
    assert not hasattr(search_commands, "_emit_json")
    for module in (main, classify_commands, finetune_commands, report_commands, scale_commands, search_commands):
        assert module.friendly is friendly_module.friendly
        assert module.emit_json is friendly_module.emit_json


def test_emit_json_prints_indented_json_with_paths_as_text() -> None:
    from embedstore_cli.friendly import emit_json

    @click.command()
    def show() -> None:
        emit_json({"store": Path("a/b.h5"), "n": 3})

    res = CliRunner().invoke(show, [])
    assert res.exit_code == 0
    assert json.loads(res.output) == {"store": "a/b.h5", "n": 3}
    assert res.output.startswith('{\n  "store"')


@pytest.fixture()
def pictures(tmp_path: Path) -> Path:
    return make_collection(tmp_path / "pics", per_class=1, splits=())


def test_expand_images_lists_files_and_folders_in_order(pictures: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    one = sorted(pictures.rglob("*.png"))[0]
    rel_one = one.relative_to(tmp_path)
    items = expand_images([str(rel_one), "pics"])
    assert all(isinstance(it, ImageItem) and Path(it.path).is_absolute() and not it.refusal for it in items)
    assert items[0] == ImageItem(str(one), str(rel_one))
    in_folder = sorted(p.relative_to(pictures) for p in pictures.rglob("*.png"))
    assert [it.rel for it in items[1:]] == [str(Path("pics") / p) for p in in_folder]
    assert [Path(it.path) for it in items[1:]] == [pictures.resolve() / p for p in in_folder]


def test_expand_images_names_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(MissingImageError) as caught:
        expand_images([missing], what="query image")
    e = caught.value
    assert isinstance(e, CollectionError) and isinstance(e, FileNotFoundError)
    assert e.filename == str(missing)
    assert str(e) == f"query image {missing} does not exist: pass image files or folders of images"
    with pytest.raises(MissingImageError, match="no images in an empty list"):
        expand_images([])


def test_search_names_a_missing_query_image(tiny_store: Path, tmp_path: Path) -> None:
    from embedstore.search import search

    missing = tmp_path / "gone.png"
    with pytest.raises(FileNotFoundError, match=f"query image {missing} does not exist") as caught:
        search(tiny_store, images=[str(missing)])
    assert isinstance(caught.value, CollectionError) and caught.value.filename == str(missing)
