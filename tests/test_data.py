"""Reader stage: discovery of layouts and robust decoding of real and hostile files."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen import draw_image, make_collection
from embedstore.errors import CollectionError
from embedstore.data import ImageItem, ImageReader, decode_image, discover, draft_size


def test_discover_split_class_layout(collection: Path):
    root, items = discover(collection)
    assert root == str(collection.resolve())
    assert len(items) == 36
    assert {it.split for it in items} == {"train", "val"}
    assert {it.label for it in items} == {"red_disc", "green_square", "blue_stripes"}
    it = items[0]
    assert os.path.isabs(it.path) and not os.path.isabs(it.rel)
    assert it.rel.split(os.sep)[:2] == [it.split, it.label]


def test_discover_class_layout_and_ignores_non_images(tmp_path: Path):
    make_collection(tmp_path, per_class=2, splits=())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    _, items = discover(tmp_path)
    assert len(items) == 6
    assert all(it.split == "" for it in items)
    assert sorted({it.label for it in items}) == ["blue_stripes", "green_square", "red_disc"]


def test_discover_csv_list(tmp_path: Path):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    rows = ["path,label,split", "imgs/red_disc/red_disc_000.png,red,train", "imgs/missing.png,none,validation"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    root, items = discover(tmp_path / "list.csv")
    assert root == str(tmp_path.resolve())
    assert [(it.rel, it.label, it.split) for it in items] == [
        (os.path.join("imgs", "red_disc", "red_disc_000.png"), "red", "train"),
        (os.path.join("imgs", "missing.png"), "none", "val"),
    ]


def test_discover_survives_symlink_loop(tmp_path: Path):
    make_collection(tmp_path, per_class=1, splits=())
    os.symlink(tmp_path, tmp_path / "red_disc" / "loop")
    _, items = discover(tmp_path)
    assert len(items) == 3


def test_discover_missing_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CollectionError, match="does not exist"):
        discover(tmp_path / "nope")


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 30), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = decode_image(_jpeg(im, exif=exif.tobytes()))
    assert out.size == (30, 60)


def test_draft_mode_keeps_both_sides_above_min_size():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    out = decode_image(_jpeg(big), min_size=256)
    assert out.size[0] < 1600 and min(out.size) >= 256
    assert decode_image(_jpeg(big)).size == (1600, 1200)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("CMYK", (20, 20), (0, 255, 255, 0)),
        lambda: Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)),
        lambda: Image.new("P", (20, 20), 0),
        lambda: Image.new("LA", (20, 20), (100, 0)),
        lambda: Image.new("1", (20, 20), 1),
    ],
    ids=["cmyk", "16bit", "palette", "gray-alpha", "bilevel"],
)
def test_any_mode_decodes_to_rgb(make):
    im = make()
    buf = io.BytesIO()
    im.save(buf, "JPEG" if im.mode == "CMYK" else "PNG", **({"transparency": 0} if im.mode == "P" else {}))
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (20, 20)


def test_sixteen_bit_png_is_scaled_not_clipped():
    im = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    value = np.asarray(decode_image(buf.getvalue()))[0, 0, 0]
    assert 120 <= value <= 135


def test_transparent_palette_composites_on_white():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0] * 256)
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)
    assert np.asarray(decode_image(buf.getvalue()))[0, 0].tolist() == [255, 255, 255]


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(buf.getvalue()))[0, 0, 0] > 200


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, "PNG")
    with pytest.raises(Image.DecompressionBombError):
        decode_image(buf.getvalue())


def test_reader_records_bad_files_and_reads_good_ones(tmp_path: Path):
    good = tmp_path / "good.png"
    draw_image("red_disc", 1).save(good)
    jpg = _jpeg(draw_image("green_square", 2))
    files = {
        "good.png": None,
        "zero.jpg": b"",
        "text.jpg": b"<html>not an image</html>",
        "truncated.jpg": jpg[: len(jpg) // 2],
        "corrupt.png": good.read_bytes()[:40] + b"\x00" * 200,
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    items = [ImageItem(str(tmp_path / n), n) for n in files] + [ImageItem(str(tmp_path / "gone.png"), "gone.png")]
    from timm.data import create_transform

    reader = ImageReader(items, create_transform(input_size=64, normalize=False), min_size=64)
    results = [reader[i] for i in range(len(items))]
    by_name = {items[r.index].rel: r for r in results}
    assert by_name["good.png"].error == "" and tuple(by_name["good.png"].pixels.shape) == (3, 64, 64)
    assert by_name["good.png"].hash and by_name["good.png"].size == good.stat().st_size
    for bad in ("zero.jpg", "text.jpg", "truncated.jpg", "corrupt.png", "gone.png"):
        assert by_name[bad].error, bad
        assert by_name[bad].pixels is None
    assert by_name["gone.png"].error == "FileNotFoundError"
    assert (by_name["zero.jpg"].error, by_name["zero.jpg"].message) == ("EmptyFileError", "empty file (0 bytes): nothing to decode")
    assert by_name["text.jpg"].message == "cannot identify image file (not an image Pillow can read)"


def test_draft_size_follows_the_model_config():
    assert draft_size({"input_size": [3, 224, 224], "crop_pct": 0.875}) == 256
    assert draft_size({"input_size": [3, 384, 384], "crop_pct": 1.0}) == 384
