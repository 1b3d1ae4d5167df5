"""The torchvision JPEG path (issue 19) gives the reference's pixels: Pillow + timm's eval transform.

Measured here on the generated files below: at most 2 levels apart on any pixel, mean absolute
difference under 0.02 per image (the antialiased uint8 tensor resize rounds a few pixels the other
way from Pillow's); the same errors as before for bombs, truncated and corrupt files.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from imagegen import TINY_BACKBONE, draw_image
from embedstore.data import ImageItem, ImageReader, decode_image, draft_size
import embedstore.data.decode as decode_module
from embedstore.data.decode import Decoder, tensor_transform
from embedstore.errors import EmbedOptionError

MAX_ABS, MAX_MEAN = 3, 0.05  # the tolerance asserted (measured: max 2, mean < 0.02)
TINY_CONFIG = {"input_size": (3, 160, 160), "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center"}


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A photo-like image: a drawn shape scaled up (smooth edges) plus fine noise (texture)."""
    rng = np.random.default_rng(seed)
    base = draw_image(("red_disc", "green_square", "blue_stripes")[seed % 3], seed).resize((width, height), Image.BICUBIC)
    arr = np.asarray(base).astype(np.int16) + rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert(mode)


def encode(im: Image.Image, fmt: str = "JPEG", orientation: int | None = None, **kw) -> bytes:
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


FILES = {  # name: (bytes, which path "auto" takes with the tiny model's draft size)
    "small": (lambda: encode(photo(120, 90)), "torchvision"),
    "square-224": (lambda: encode(photo(224, 224, 1)), "torchvision"),
    "wide-320x200": (lambda: encode(photo(320, 200, 2)), "torchvision"),
    "tall-200x460": (lambda: encode(photo(200, 460, 3)), "torchvision"),  # Pillow resizes it vertically first
    "exif-3": (lambda: encode(photo(300, 200, 4), orientation=3), "torchvision"),
    "exif-6": (lambda: encode(photo(300, 200, 5), orientation=6), "torchvision"),
    "exif-8": (lambda: encode(photo(300, 200, 6), orientation=8), "torchvision"),
    "exif-5": (lambda: encode(photo(260, 180, 7), orientation=5), "torchvision"),
    "progressive": (lambda: encode(photo(300, 220, 8), progressive=True), "torchvision"),
    "mpo": (lambda: encode(photo(240, 180, 9), "MPO", save_all=True, append_images=[photo(240, 180, 10)]),
            "torchvision"),
    "large-1500x1000": (lambda: encode(photo(1500, 1000, 11)), "pillow"),  # draft scale 4
    "large-exif-6": (lambda: encode(photo(1500, 1000, 12), orientation=6), "pillow"),
    "grayscale": (lambda: encode(photo(300, 200, 13, "L")), "pillow"),
    "cmyk": (lambda: encode(photo(200, 150, 14, "CMYK")), "pillow"),
    "png": (lambda: encode(photo(300, 200, 15), "PNG"), "pillow"),
}


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {name: make() for name, (make, _) in FILES.items()}


def tiny_transform(**config):
    return create_transform(**{**TINY_CONFIG, **config}, is_training=False, normalize=False)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape, what
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= MAX_ABS and diff.float().mean() < MAX_MEAN, (what, int(diff.max()), float(diff.float().mean()))


@pytest.fixture
def paths_taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per file torchvision was asked to decode (True: it did)."""
    taken: list[bool] = []
    real = decode_module._torchvision_decode

    def spy(data: bytes):
        out = real(data)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(decode_module, "_torchvision_decode", spy)
    return taken


def test_auto_matches_the_pillow_reference_and_routes_each_file(files, paths_taken):
    tf = tiny_transform()
    size = draft_size(TINY_CONFIG)
    reference, auto = Decoder(tf, size, "pillow"), Decoder(tf, size, "auto")
    for name, data in files.items():
        ref = reference(data)
        assert torch.equal(ref, torch.as_tensor(np.asarray(tf(decode_image(data, size)))))  # "pillow" is the old path
        paths_taken.clear()
        assert_close(auto(data), ref, name)
        assert paths_taken == ([True] if FILES[name][1] == "torchvision" else []), name


@pytest.mark.parametrize("config", [
    {},
    {"interpolation": "bilinear"},
    {"crop_mode": "squash", "crop_pct": 0.875},
    {"crop_mode": "border", "crop_pct": 1.0},
    {"input_size": (3, 160, 224), "crop_pct": 0.9},
], ids=["center-bicubic", "bilinear", "squash", "border", "non-square-input"])
def test_forced_torchvision_full_decode_matches_pillow_without_draft(files, config, paths_taken):
    """Every 8-bit colour JPEG through torchvision at full size (the 1500 px ones too), each crop mode."""
    tf = tiny_transform(**config)
    assert tensor_transform(tf) is not None
    reference, forced = Decoder(tf, None, "pillow"), Decoder(tf, None, "torchvision")
    for name, data in files.items():
        assert_close(forced(data), reference(data), f"{name} {config}")
    assert sum(paths_taken) == sum(1 for _, path in FILES.values() if path == "torchvision") + 2  # + the large ones


def test_tensor_resize_follows_pillows_pass_order():
    """Pillow 13 resizes vertically first when the height loses more than twice what the width loses:
    the tensor path must do the same or squash resizes of tall images come out ~0.3 levels off."""
    rng = np.random.default_rng(0)
    for (H, W), (h, w) in [((500, 333), (256, 256)), ((375, 500), (256, 256)), ((900, 300), (512, 170)),
                           ((375, 500), (256, 600)), ((300, 300), (100, 150)), ((200, 100), (230, 90))]:
        arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        for mode in ("bicubic", "bilinear"):
            tf = create_transform(input_size=(3, h, w), crop_mode="squash", crop_pct=1.0, interpolation=mode,
                                  is_training=False, normalize=False)
            ref = torch.as_tensor(np.asarray(tf(Image.fromarray(arr))))
            out = tensor_transform(tf)(torch.from_numpy(arr).permute(2, 0, 1))
            assert_close(out, ref, f"{(H, W)} -> {(h, w)} {mode}")


def test_embeddings_of_both_paths_agree(files):
    from embedstore import load_backbone
    from embedstore.embedding import Embedder

    bb = load_backbone(TINY_BACKBONE, weights="random")
    embedder = Embedder(bb, device="cpu", precision="fp32")
    tf, size = bb.eval_transform(), draft_size(bb.data_config)
    ref = embedder(torch.stack([Decoder(tf, size, "pillow")(d) for d in files.values()]))
    new = embedder(torch.stack([Decoder(tf, size, "auto")(d) for d in files.values()]))
    cosine = (ref * new).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(new, axis=1)
    assert cosine.min() >= 0.999, dict(zip(files, cosine.round(5)))


def _claim_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size: a bomb without the pixels."""
    at = jpeg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height and width
    return jpeg[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[at + 4:]


def test_bomb_check_runs_before_torchvision(tmp_path: Path, paths_taken):
    bomb = _claim_size(encode(photo(64, 48)), 12000, 9000)
    with pytest.raises(Image.DecompressionBombError) as reference:
        decode_image(bomb)
    with pytest.raises(Image.DecompressionBombError) as auto:
        Decoder(tiny_transform(), None, "torchvision")(bomb)
    assert str(auto.value) == str(reference.value) and "decompression bomb" in str(reference.value)
    assert paths_taken == []  # refused from the header: torchvision never saw it


def test_bad_jpegs_record_the_same_errors_as_before(tmp_path: Path):
    good = encode(photo(240, 180))
    mid = len(good) // 2
    bad = {
        "truncated.jpg": good[:mid],
        "no-end-marker.jpg": good[:-2],
        "header-only.jpg": good[:600],
        "zeroed-middle.jpg": good[:mid] + b"\x00" * 400 + good[mid + 400:],
        "junk-after-end.jpg": good + b"trailing junk",
        "text.jpg": b"<html>not an image</html>",
        "zero.jpg": b"",
        "bomb.jpg": _claim_size(good, 12000, 9000),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    items = [ImageItem(str(tmp_path / n), n) for n in bad]
    tf = tiny_transform()
    old = [ImageReader(items, tf, 160, decoder="pillow")[i] for i in range(len(items))]
    new = [ImageReader(items, tf, 160)[i] for i in range(len(items))]
    for name, o, n in zip(bad, old, new):
        assert (n.error, n.message) == (o.error, o.message), name
        if o.pixels is None:
            assert n.pixels is None, name
        else:
            assert_close(n.pixels, o.pixels, name)
    by_name = {name: o for name, o in zip(bad, old)}
    assert by_name["truncated.jpg"].error == "OSError" and "truncated" in by_name["truncated.jpg"].message
    assert by_name["bomb.jpg"].error == "DecompressionBombError"
    assert not by_name["junk-after-end.jpg"].error


def test_decoder_choice_is_checked_and_unreplayed_transforms_stay_on_pillow(files):
    with pytest.raises(EmbedOptionError, match="decoder='fast'"):
        Decoder(tiny_transform(), None, "fast")
    train = create_transform(input_size=160, is_training=True, normalize=False)
    assert tensor_transform(train) is None
    with pytest.raises(EmbedOptionError, match="decoder='auto'"):
        Decoder(train, None, "torchvision")
    lanczos = tiny_transform(interpolation="lanczos")
    assert tensor_transform(lanczos) is None
    data = files["wide-320x200"]
    assert torch.equal(Decoder(lanczos, None, "auto")(data), Decoder(lanczos, None, "pillow")(data))
