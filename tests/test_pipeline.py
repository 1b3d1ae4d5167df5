"""embed end to end: incremental runs, several spaces, bad files, CLI, sklearn Pipeline."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import embedstore
from imagegen import TINY_BACKBONE, draw_image, make_collection
from embedstore_cli.main import main

TINY = dict(backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)


def test_embed_records_images_labels_and_space(tiny_store: Path, collection: Path):
    st = embedstore.open_store(tiny_store)
    assert st.n_images == 36 and st.failures == []
    sp = st.space()
    assert sp.name == "test_efficientnet-random" and sp.vectors.shape == (36, sp.dim)
    assert sp.vectors.dtype == np.float16 and np.isfinite(sp.vectors.astype(np.float32)).all()
    assert set(sp.labels) == {"red_disc", "green_square", "blue_stripes"}
    assert (sp.splits == "train").sum() == 18
    a = sp.attrs
    assert a["backbone"] == TINY_BACKBONE and len(a["weights_sha256"]) == 64
    assert a["preprocessing"]["input_size"][-1] > 0 and "torch" in a["versions"] and a["created"]
    first = Path(st.abspath(sp.paths[0]))
    assert first.is_file() and first.is_relative_to(collection.resolve())


def test_rerun_embeds_only_new_and_changed_files(tiny_store: Path, collection: Path):
    before = embedstore.open_store(tiny_store).space()
    again = embedstore.embed(collection, tiny_store, **TINY)
    assert again["embedded"] == 0 and again["unchanged"] == 36

    new = collection / "train" / "red_disc" / "new.png"
    draw_image("red_disc", 999).save(new)
    changed = collection / "val" / "green_square" / "green_square_000.png"
    draw_image("blue_stripes", 123).save(changed)  # new content under an old name
    touched = collection / "val" / "red_disc" / "red_disc_000.png"
    os.utime(touched, (1, 1))  # same bytes, new mtime: detected by hash, not re-embedded
    summary = embedstore.embed(collection, tiny_store, **TINY)
    assert (summary["embedded"], summary["unchanged"]) == (2, 35)

    after = embedstore.open_store(tiny_store).space()
    assert len(after) == 37 and len(set(after.rows.tolist())) == 37
    old = dict(zip(before.paths, before.vectors.astype(np.float32)))
    now = dict(zip(after.paths, after.vectors.astype(np.float32)))
    rel_changed = str(changed.relative_to(collection))
    assert not np.allclose(old[rel_changed], now[rel_changed])
    for p in old:
        if p != rel_changed:
            np.testing.assert_array_equal(old[p], now[p])


def test_second_backbone_adds_a_space_beside_the_first(tiny_store: Path, collection: Path):
    embedstore.embed(collection, tiny_store, backbone="test_vit", weights="random", workers=0, progress=False,
                     dtype="float32")
    st = embedstore.open_store(tiny_store)
    assert set(st.spaces) == {"test_efficientnet-random", "test_vit-random"}
    assert st.space("test_vit-random").vectors.dtype == np.float32
    assert st.n_images == 36


def test_bad_files_are_recorded_and_the_rest_embed(tmp_path: Path):
    root = make_collection(tmp_path / "imgs", per_class=2, splits=())
    good = (root / "red_disc" / "red_disc_000.png").read_bytes()
    (root / "red_disc" / "zero.jpg").write_bytes(b"")
    (root / "red_disc" / "page.jpg").write_text("<html><body>404</body></html>")
    (root / "red_disc" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "red_disc" / "corrupt.png").write_bytes(good[:30] + bytes(range(256)) * 4)
    store = tmp_path / "s.h5"
    summary = embedstore.embed(root, store, **TINY)
    assert (summary["embedded"], summary["failed"]) == (6, 4)
    st = embedstore.open_store(store)
    assert {Path(f["path"]).name for f in st.failures} == {"zero.jpg", "page.jpg", "truncated.png", "corrupt.png"}
    assert all(f["error"] and f["message"] for f in st.failures)
    assert embedstore.embed(root, store, **TINY)["known_failures"] == 4  # not retried while unchanged
    shutil.copy(root / "red_disc" / "red_disc_001.png", root / "red_disc" / "zero.jpg")  # fixed by the user
    fixed = embedstore.embed(root, store, **TINY)
    assert fixed["embedded"] == 1 and len(embedstore.open_store(store).failures) == 3


def test_csv_list_with_missing_files(tmp_path: Path):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    lines = [f"imgs/{c}/{c}_000.png,{c},train" for c in ("red_disc", "green_square")] + ["imgs/gone.png,x,val"]
    (tmp_path / "list.csv").write_text("\n".join(lines))
    summary = embedstore.embed(tmp_path / "list.csv", tmp_path / "s.h5", **TINY)
    assert (summary["embedded"], summary["failed"]) == (2, 1)
    st = embedstore.open_store(tmp_path / "s.h5")
    assert st.failures[0]["error"] == "FileNotFoundError"
    assert sorted(st.space().labels) == ["green_square", "red_disc"]


def test_cli_embed_and_info_json(tmp_path: Path, collection: Path):
    store = tmp_path / "cli.h5"
    runner = CliRunner()
    res = runner.invoke(main, ["embed", str(collection), "--store", str(store), "--backbone", TINY_BACKBONE,
                               "--weights", "random", "--workers", "0", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    for key in ("images", "embedded", "skipped", "failed", "seconds", "images_per_s", "space"):
        assert key in summary
    assert summary["embedded"] == 36
    res = runner.invoke(main, ["info", str(store), "--json"])
    info = json.loads(res.output)
    assert info["images"] == 36 and info["failures"] == 0
    (space,) = info["spaces"]
    assert {k: space[k] for k in ("name", "backbone", "rows", "dtype")} == {
        "name": "test_efficientnet-random", "backbone": TINY_BACKBONE, "rows": 36, "dtype": "float16"}
    assert space["dim"] > 0


def test_cli_errors_are_one_clear_line(tmp_path: Path, collection: Path):
    runner = CliRunner()
    res = runner.invoke(main, ["info", str(tmp_path / "missing.h5")])
    assert res.exit_code == 1 and "embedstore embed" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["embed", str(collection), "--store", str(tmp_path / "s.h5"), "--backbone", "nope_net"])
    assert res.exit_code == 1 and "unknown backbone" in res.output


def test_cli_backbones_lists_offline_default_first():
    res = CliRunner().invoke(main, ["backbones", "--json"])
    rows = json.loads(res.output)
    assert rows[0]["name"] == "efficientnet_lite0" and rows[0]["offline"] and rows[0]["dim"] == 1280


def test_embedding_transformer_in_a_pipeline(collection: Path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    _, items = embedstore.discover(collection)
    train = [it for it in items if it.split == "train"]
    val = [it for it in items if it.split == "val"]
    pipe = make_pipeline(embedstore.EmbeddingTransformer(backbone=TINY_BACKBONE, weights="random"),
                         LogisticRegression(max_iter=2000))
    pipe.fit([it.path for it in train], [it.label for it in train])
    acc = (pipe.predict([it.path for it in val]) == np.array([it.label for it in val])).mean()
    assert acc >= 0.8


def test_transformer_names_unreadable_files(tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    t = embedstore.EmbeddingTransformer(backbone=TINY_BACKBONE, weights="random")
    with pytest.raises(ValueError, match="bad.jpg"):
        t.fit_transform([str(bad)])
