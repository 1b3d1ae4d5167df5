"""Rows of tar shards, URLs and files read back after embedding (issue 20): report thumbnails and the
fine-tune stage read tar members from their shard; URLs are never fetched for a report."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

import embedstore
from embedstore.data.stored import NOT_FETCHED, stored_items
from imagegen import TINY_BACKBONE, draw_image
from sourcegen import image_bytes, write_shard

TINY = dict(backbone=TINY_BACKBONE, weights="random", workers=0, progress=False, batch_size=8)


@pytest.fixture
def shard_store(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "coll"
    write_shard(root / "train" / "shard-000.tar", 0, 5)
    (root / "val" / "cat").mkdir(parents=True)
    draw_image("red_disc", 7).save(root / "val" / "cat" / "a.png")
    store = tmp_path / "s.h5"
    summary = embedstore.embed(root, store, **TINY)
    assert (summary["embedded"], summary["failed"]) == (6, 0)
    return root, store


def test_keys_become_readable_items(shard_store):
    root, store = shard_store
    st = embedstore.open_store(store)
    keys = list(st.space().paths) + ["http://127.0.0.1:9/x.jpg", "train/shard-000.tar/nope.jpg", "gone.png"]
    items = stored_items(st.root, keys)
    with tarfile.open(root / "train" / "shard-000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")}
    for it in items[:6]:
        if ".tar/" in it.rel:
            assert it.source.read(it, 1 << 20) == members[it.rel.rsplit("/", 1)[1]]
        else:
            assert Path(it.path).read_bytes() == (root / it.rel).read_bytes()
    url, no_member, gone = items[6:]
    assert url.refusal == NOT_FETCHED
    assert no_member.source is None and not Path(no_member.path).exists()  # the reader records it missing
    assert gone.path == str(root / "gone.png") and gone.source is None


def test_report_thumbnails_show_tar_members_and_flag_a_changed_one(shard_store):
    from embedstore.report.thumbs import CHANGED, Thumbnails

    root, store = shard_store
    st = embedstore.open_store(store)
    thumbs = Thumbnails(st, 48)
    thumbs.add(range(st.n_images))
    assert not thumbs.missing and not thumbs.changed
    assert all(not thumbs.img(r)["missing"] for r in range(st.n_images))

    write_shard(root / "train" / "shard-000.tar", 0, 5, changed={3: image_bytes(40)})  # rewritten after embedding
    st = embedstore.open_store(store)
    thumbs = Thumbnails(st, 48)
    thumbs.add(range(st.n_images))
    changed = [str(st.image_column("path", np.array([r]))[0]) for r in thumbs.changed]
    assert changed == ["train/shard-000.tar/sample00003.jpg"] and thumbs.img(sorted(thumbs.changed)[0])["missing"]
    assert CHANGED in thumbs.WHY


def test_finetune_items_read_tar_members(shard_store):
    from embedstore.data import ImageReader
    from embedstore.finetuning.publish import items_of
    from timm.data import create_transform

    _, store = shard_store
    st = embedstore.open_store(store)
    sp = st.space()
    rows = list(zip(sp.paths, sp.labels, sp.splits))
    tf = create_transform(input_size=(3, 64, 64), is_training=False)
    reader = ImageReader(items_of(st, rows), tf, 64)
    results = [reader[i] for i in range(len(rows))]
    assert [r.error for r in results] == [""] * len(rows)
    assert [r.hash for r in results] == list(st.image_column("hash", np.arange(st.n_images))[
        st.rows_of(list(sp.paths))])


def test_served_media_names_a_tar_member_instead_of_a_missing_file(shard_store):
    from embedstore.errors import MediaError
    from embedstore.serve.media import row_image

    _, store = shard_store
    st = embedstore.open_store(store)
    row = int(st.rows_of(["train/shard-000.tar/sample00001.jpg"])[0])
    with pytest.raises(MediaError, match="member of a tar shard") as e:
        row_image(st, row)
    assert e.value.status == 404
