"""Hostile and unusual files: each gets a recorded skip or embeds; the run never crashes."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

import embedstore
from imagegen import TINY_BACKBONE, draw_image

TINY = dict(backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def hostile_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """Write the zoo; return (names that must embed, {name: expected error type})."""
    root.mkdir(parents=True)
    photo = draw_image("red_disc", 7)
    jpeg = _save(photo, "JPEG")
    png = _save(photo, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 8
    gif_frames = [draw_image("blue_stripes", i).convert("P") for i in range(3)]
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    good = {
        "plain.png": png,
        "cmyk.jpg": _save(photo.convert("CMYK"), "JPEG"),
        "sixteen_bit.png": _save(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "PNG"),
        "palette_transparent.png": _save(palette, "PNG", transparency=0),
        "exif_rotated.jpg": _save(photo.resize((80, 40)), "JPEG", exif=exif.tobytes()),
        "animated.gif": _save(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:]),
        "ünïcödé 写真.jpg": jpeg,
        ("long_" + "x" * 240 + ".jpg"): jpeg,
        "grey.webp": _save(photo.convert("L"), "WEBP"),
    }
    bad = {
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "OSError"),
        "corrupt.png": (png[:16] + b"\x00" * 300, "SyntaxError"),
        "zero.jpg": (b"", "EmptyFileError"),
        "text.jpg": (b"just some text, not an image\n" * 20, "UnidentifiedImageError"),
        "page.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", "UnidentifiedImageError"),
        "bomb.png": (_save(Image.new("1", (12000, 12000)), "PNG"), "DecompressionBombError"),
    }
    for name, data in good.items():
        (root / name).write_bytes(data)
    for name, (data, _) in bad.items():
        (root / name).write_bytes(data)
    (root / "loop").mkdir()
    os.symlink(root, root / "loop" / "back_to_root")  # a symlink loop
    return set(good), {name: err for name, (_, err) in bad.items()}


def test_hostile_zoo_embeds_the_good_and_records_the_bad(tmp_path: Path):
    must_embed, must_fail = hostile_folder(tmp_path / "zoo")
    summary = embedstore.embed(tmp_path / "zoo", tmp_path / "zoo.h5", **TINY)
    st = embedstore.open_store(tmp_path / "zoo.h5")
    embedded = {Path(p).name for p in st.space().paths}
    failed = {Path(f["path"]).name: f["error"] for f in st.failures}
    assert embedded == must_embed
    assert set(failed) == set(must_fail)
    for name, err in must_fail.items():
        assert failed[name] in (err, "OSError", "SyntaxError", "UnidentifiedImageError", "ValueError"), (name, failed)
    assert failed["bomb.png"] == "DecompressionBombError"  # refused by pixel count, before decoding
    assert summary["embedded"] == len(must_embed) and summary["failed"] == len(must_fail)
    assert np.isfinite(st.space().vectors.astype(np.float32)).all()


def test_exif_rotation_changes_the_embedding_like_a_real_rotation(tmp_path: Path):
    photo = draw_image("green_square", 3).resize((96, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tagged.png").write_bytes(_save(photo, "PNG", exif=exif.tobytes()))
    (tmp_path / "a" / "rotated.png").write_bytes(_save(photo.transpose(Image.Transpose.ROTATE_270), "PNG"))
    embedstore.embed(tmp_path / "a", tmp_path / "s.h5", **TINY)
    sp = embedstore.open_store(tmp_path / "s.h5").space()
    v = dict(zip((Path(p).name for p in sp.paths), sp.vectors.astype(np.float32)))
    np.testing.assert_allclose(v["tagged.png"], v["rotated.png"], atol=1e-2)
