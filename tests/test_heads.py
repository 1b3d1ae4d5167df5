"""Saved heads: round trip, end-to-end predict, foreign spaces and tampered files refused."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
import skops.io as sio
from click.testing import CliRunner
from imagegen import TINY_BACKBONE

import embedstore
from embedstore.heads import classify
from embedstore.errors import HeadError
from embedstore.heads import load_head, predict_images
from embedstore.heads.saved import MANIFEST, PAYLOAD
from embedstore_cli.classify_commands import register


def cli() -> click.Group:
    @click.group()
    def group() -> None:
        pass

    register(group)
    return group


@pytest.fixture
def saved(tiny_store: Path, tmp_path: Path) -> tuple[Path, object]:
    report = classify(str(tiny_store), models=["logreg", "knn"])
    return Path(report.save_head(str(tmp_path / "head"), model="logreg")), report


def test_round_trip_predicts_the_same_labels(saved: tuple[Path, object], tiny_store: Path, tmp_path: Path) -> None:
    folder, report = saved
    sp = embedstore.open_store(tiny_store).space()
    X = sp.vectors.astype(np.float32)
    head = load_head(folder)
    fitted, _ = report.head(model="logreg")
    np.testing.assert_array_equal(head.predict_space(sp), fitted.estimator.predict(X))
    np.testing.assert_allclose(head.predict_proba(X), fitted.estimator.predict_proba(X))
    assert head.lineage["backbone"] == TINY_BACKBONE and head.lineage["weights_sha256"] == sp.attrs["weights_sha256"]
    assert head.metrics["accuracy"] >= 0.9 and head.classes == sorted(set(sp.labels))
    # the k-NN head (an embedstore class) survives the trip too; its FAISS index is rebuilt
    knn_dir = Path(report.save_head(str(tmp_path / "knn"), model="knn"))
    knn = load_head(knn_dir)
    np.testing.assert_array_equal(knn.predict(X), report.head(model="knn")[0].estimator.predict(X))


def test_predict_embeds_images_end_to_end(saved: tuple[Path, object], tiny_store: Path, collection: Path) -> None:
    folder, _ = saved
    head = load_head(folder)
    sp = embedstore.open_store(tiny_store).space()
    preds = predict_images(folder, [collection / "val"], top_k=2, workers=0)
    assert len(preds) == 18
    by_name = {Path(p["image"]).name: p for p in preds}
    stored = dict(zip((Path(p).name for p in sp.paths), head.predict_space(sp)))
    assert all(by_name[n]["label"] == stored[n] for n in by_name)  # same labels as the store's vectors
    assert np.mean([Path(p["image"]).parent.name == p["label"] for p in preds]) >= 0.9
    assert all(len(p["top"]) == 2 and 0 < p["probability"] <= 1 for p in preds)

    one = next((collection / "val" / "red_disc").iterdir())
    res = CliRunner().invoke(cli(), ["predict", str(folder), str(one), "--json", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["backbone"] == TINY_BACKBONE and out["predictions"][0]["label"] == "red_disc"
    assert [t["label"] for t in out["predictions"][0]["top"]][0] == "red_disc"
    res = CliRunner().invoke(cli(), ["predict", str(folder), str(one)])
    assert res.exit_code == 0 and "red_disc" in res.output


def test_unreadable_image_is_reported_not_fatal(saved: tuple[Path, object], tmp_path: Path, collection: Path) -> None:
    folder, _ = saved
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    good = next((collection / "val" / "green_square").iterdir())
    preds = predict_images(folder, [bad, good], workers=0)
    assert "error" in preds[0] and preds[1]["label"] == "green_square"


def test_head_refuses_a_store_of_another_backbone(saved: tuple[Path, object], collection: Path, tmp_path: Path) -> None:
    folder, _ = saved
    other = tmp_path / "other.h5"
    embedstore.embed(collection, other, backbone="test_resnet", weights="random", workers=0, progress=False)
    head = load_head(folder)
    with pytest.raises(HeadError, match="another space"):
        head.predict_space(embedstore.open_store(other).space())
    with pytest.raises(HeadError, match="takes"):
        head.predict(np.zeros((2, 7), np.float32))


def test_tampered_payload_is_refused(saved: tuple[Path, object]) -> None:
    folder, _ = saved
    payload = folder / PAYLOAD
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    with pytest.raises(HeadError, match="sha256"):
        load_head(folder)


class Intruder:
    """A type no head contains; loading it must be refused even with a matching checksum."""

    def __init__(self) -> None:
        self.classes_ = ["a"]


def test_untrusted_types_are_refused_even_with_a_matching_checksum(saved: tuple[Path, object]) -> None:
    import hashlib

    folder, _ = saved
    data = sio.dumps(Intruder())
    (folder / PAYLOAD).write_bytes(data)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["payload_sha256"] = hashlib.sha256(data).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(HeadError, match="does not load"):
        load_head(folder)


def test_missing_or_foreign_head_folder_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(HeadError, match="--save-head"):
        load_head(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": "something-else"}')
    with pytest.raises(HeadError, match="not an embedstore head"):
        load_head(tmp_path)


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_damaged_head_folders_are_clear_errors_naming_the_file_and_the_fix(saved: tuple[Path, object],
                                                                          tmp_path: Path) -> None:
    """A manifest missing a field (lineage, ...), a broken lineage, a payload that is a folder, a head
    of the older format: one HeadError each (CLI: one `Error:` line, exit 1), never KeyError or
    IsADirectoryError."""
    import shutil

    folder, _ = saved

    def damaged(name: str, edit=None) -> Path:
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        if edit:
            _edit_manifest(copy, edit)
        return copy

    for field in ("lineage", "classes", "payload_sha256", "space"):
        copy = damaged(f"no-{field}", lambda m, f=field: m.pop(f))
        with pytest.raises(HeadError, match=rf"{MANIFEST} has no '{field}'.*--save-head"):
            load_head(copy)
        res = CliRunner().invoke(cli(), ["predict", str(copy), str(copy / MANIFEST)])
        assert res.exit_code == 1 and res.output.startswith("Error: ") and f"no '{field}'" in res.output
        assert not isinstance(res.exception, KeyError)
    with pytest.raises(HeadError, match="lineage lacks dim.*--save-head"):
        load_head(damaged("no-dim", lambda m: m["lineage"].pop("dim")))
    with pytest.raises(HeadError, match="dim='wide'"):
        load_head(damaged("bad-dim", lambda m: m["lineage"].update(dim="wide")))
    with pytest.raises(HeadError, match="older embedstore.*--save-head"):
        load_head(damaged("old", lambda m: m.update(format="embedstore-head/1")))

    folder_payload = damaged("payload-folder")
    (folder_payload / PAYLOAD).unlink()
    (folder_payload / PAYLOAD).mkdir()
    with pytest.raises(HeadError, match=rf"{PAYLOAD} is a folder.*--save-head"):
        load_head(folder_payload)
    res = CliRunner().invoke(cli(), ["predict", str(folder_payload), str(folder / MANIFEST)])
    assert res.exit_code == 1 and "is a folder" in res.output and not isinstance(res.exception, IsADirectoryError)


def test_head_error_is_an_embedstore_error() -> None:
    from embedstore.errors import EmbedstoreError
    from embedstore.errors import HeadError as FromErrors

    assert HeadError is FromErrors and issubclass(HeadError, EmbedstoreError) and issubclass(HeadError, ValueError)


def _corrupt_jpg(tmp_path: Path) -> Path:
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a JPEG header, then nothing decodable
    return bad


def test_predict_on_an_unreadable_image_fails_or_keeps_going(saved: tuple[Path, object], tmp_path: Path,
                                                             collection: Path) -> None:
    """F16: without --keep-going an unreadable image is an error (exit 1) that names the file; with it
    the failure is listed with its reason and the others are labelled (exit 0)."""
    folder, _ = saved
    bad = _corrupt_jpg(tmp_path)
    good = sorted((collection / "val" / "red_disc").iterdir())[:2]
    args = ["predict", str(folder), str(good[0]), str(bad), str(good[1])]
    res = CliRunner().invoke(cli(), args)
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: 1 of 3 image(s) could not be read") and str(bad) in res.output
    assert "--keep-going" in res.output
    res = CliRunner().invoke(cli(), [*args, "--json"])
    assert res.exit_code == 1 and "corrupt.jpg" in res.output

    res = CliRunner().invoke(cli(), [*args, "--keep-going", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["failed"] == 1 and [p.get("label") for p in out["predictions"]] == ["red_disc", None, "red_disc"]
    assert out["predictions"][1]["image"] == str(bad) and out["predictions"][1]["error"]
    res = CliRunner().invoke(cli(), [*args, "--keep-going"])
    assert res.exit_code == 0, res.output
    line = next(li for li in res.stdout.splitlines() if li.startswith(str(bad)))
    assert "ERROR" in line
    assert "1 of 3 image(s) could not be read" in res.stderr

    # an absurd --top-k shows every class once (no allocation of that size)
    res = CliRunner().invoke(cli(), ["predict", str(folder), str(good[0]), "--json", "--top-k", str(10 ** 12)])
    assert res.exit_code == 0, res.output
    top = json.loads(res.stdout)["predictions"][0]["top"]
    assert sorted(t["label"] for t in top) == ["blue_stripes", "green_square", "red_disc"]
    head = load_head(folder)
    assert len(head.top_k(np.zeros((2, head.lineage["dim"])), 10 ** 15)[0]) == 3
