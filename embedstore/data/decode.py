"""Decoding image bytes to a model's pixels: the Pillow reference, and a faster path for JPEGs.

``decode_image`` is the reference: Pillow for every format and mode, the decompression-bomb check
on the header before any pixel is decoded, EXIF orientation, JPEG draft mode (DCT scaling) for
photos larger than the model needs, and any mode to 8-bit RGB. The model's timm eval transform then
resizes and crops that image.

``Decoder`` gives the same uint8 pixels faster (at most 2 levels apart, mean under 0.02): 8-bit
colour JPEGs through ``torchvision.io.decode_jpeg`` (libjpeg-turbo, EXIF orientation applied), and
the eval transform replayed on the uint8 tensor by ``tensor_transform`` (torchvision v2's
antialiased resize computes Pillow's filters; the same sizes, crops and pass order). Pillow's
header is always parsed first (bomb check); Pillow decodes every other file (other formats,
grayscale, CMYK, 12-bit) and every JPEG torchvision refuses (truncated or odd: Pillow then decodes
it or raises what it raised before); a transform this module does not replay (training
augmentations, lanczos, naflex) runs on the Pillow image as before.

Large photos keep Pillow's draft mode (DCT scaling), which torchvision cannot do: JPEGs whose draft
scale is 2 or more (both sides at least twice the resize target) are decoded by Pillow at that
scale, then transformed on the tensor. Measured per core (1 thread, ``benchmarks/decode.py``,
results/decode.json; efficientnet_lite0's transform, draft size 256), images/s of the reference /
torchvision full decode / this rule: imagenette val 224 px 763 / 1603 / 1608 (2.1x);
hymenoptera ~500 px 291 / 478 / 484 (1.7x); hymenoptera photos upscaled (Pillow LANCZOS, JPEG q90)
to 1000 px (draft scale 2) 268 / 278 / 354, to 3000x2000 (scale 4-8) 101 / 50 / 108. The full decode is no faster at scale 2 and half as
fast at 4-8, and it would not give the reference's pixels there (draft decoding is part of the
reference: mean 0.7-4 levels apart). ``decoder="pillow"`` forces the reference for every file,
``"torchvision"`` the full decode of every JPEG it can take.

Crash safety: decodes bytes in memory only; writes nothing.
"""
from __future__ import annotations

import inspect
import io
import warnings
from functools import partial
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import EmbedOptionError

# Refuse decompression bombs by pixel count (Pillow's limit), before any pixel is decoded.
MAX_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False
DECODERS = ("auto", "pillow", "torchvision", "device")
EXIF_ORIENTATION = 0x0112
# "auto" leaves a JPEG to Pillow when its draft mode would decode it at 1/2 scale or less (measured).
PILLOW_DRAFT_SCALE = 2


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazily opened image (only the header is parsed), refused when it is a decompression bomb."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > MAX_PIXELS:
                raise Image.DecompressionBombWarning(f"{im.width}x{im.height} pixels")
        except UnidentifiedImageError:  # Pillow's message names the BytesIO object, not the file
            raise UnidentifiedImageError("cannot identify image file (not an image Pillow can read)") from None
        except Image.DecompressionBombWarning as w:
            raise Image.DecompressionBombError(
                f"refused: {w} exceeds the limit of {MAX_PIXELS} pixels (possible decompression bomb)"
            ) from None
    return im


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode bytes to an RGB image: EXIF orientation applied, JPEG draft mode for large photos.

    ``min_size`` lets JPEG decoding skip detail (DCT scaling) while keeping both sides at least
    that many pixels. Raises on corrupt, truncated, non-image and over-large (bomb) input.
    """
    return _pillow_rgb(open_image(data), min_size)


def _pillow_rgb(im: Image.Image, min_size: int | None) -> Image.Image:
    if min_size and im.format == "JPEG":
        im.draft("RGB", (min_size, min_size))
    return to_rgb(ImageOps.exif_transpose(im))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB (16-bit scaled down, transparency composited on white)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        peak = 65535 if im.mode.startswith("I;16") or arr.max() > 255 else 255
        return Image.fromarray((arr * 255 // peak).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


class Encoded(NamedTuple):
    """A JPEG checked but left encoded for the device (``decoder="device"``, :mod:`.device_decode`):
    its bytes (uint8, CPU) and its EXIF orientation (1-8)."""

    data: torch.Tensor
    orientation: int


class Decoder:
    """Bytes to the transform's uint8 CHW pixels, choosing per file between torchvision and Pillow.

    ``decoder``:

    * ``"auto"``: 8-bit colour JPEGs that draft mode would not shrink are decoded by torchvision;
      every other file by Pillow (draft mode for large JPEGs); then the transform runs on the
      uint8 tensor (:func:`tensor_transform`), or on the Pillow image where it cannot be replayed;
    * ``"pillow"``: the reference, Pillow and the transform itself, for every file;
    * ``"torchvision"``: every 8-bit colour JPEG through torchvision at full size (no draft mode),
      the rest as in ``"auto"`` (for benchmarks; refused for a transform that is not replayed);
    * ``"device"``: every 8-bit colour JPEG comes back :class:`Encoded`, to be decoded in a batch on
      the model's device (:mod:`.device_decode`); the rest as in ``"auto"``.

    Pillow's header is read first in every mode (decompression-bomb check); a file torchvision
    refuses goes to Pillow, which decodes it or raises exactly what the reference raises.
    """

    def __init__(self, transform: Callable[[Image.Image], Any], min_size: int | None, decoder: str = "auto"):
        if decoder not in DECODERS:
            raise EmbedOptionError(f"decoder={decoder!r} is not one of {', '.join(map(repr, DECODERS))}")
        self.transform, self.min_size, self.decoder = transform, min_size, decoder
        self.tensor_transform = None if decoder == "pillow" else tensor_transform(transform)
        if decoder in ("torchvision", "device") and (self.tensor_transform is None or _decode_jpeg is None):
            raise EmbedOptionError(
                f"decoder={decoder!r} needs torchvision.io.decode_jpeg and a transform it can replay on tensors, "
                f"not {transform!r}: use decoder='auto' (Pillow for what torchvision cannot do) or 'pillow'")

    def __call__(self, data: bytes) -> torch.Tensor | Encoded:
        """The uint8 CHW pixels of one file (or, for ``"device"``, a JPEG :class:`Encoded`); raises what the
        reference raises on a bad file."""
        im = open_image(data)
        if self.decoder == "device" and self._takes(im):
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), int(orientation))
        if self.tensor_transform is None:
            pixels = self.transform(_pillow_rgb(im, self.min_size))
            return pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
        x = _torchvision_decode(data) if self._takes(im) else None
        if x is None:
            x = torch.from_numpy(np.array(_pillow_rgb(im, self.min_size))).permute(2, 0, 1)
        return self.tensor_transform(x).contiguous()

    def _takes(self, im: Image.Image) -> bool:
        """Whether torchvision decodes this file (from header facts: format, mode, bits, size)."""
        if _decode_jpeg is None or im.format not in ("JPEG", "MPO") or im.mode != "RGB" or getattr(im, "bits", 8) != 8:
            return False
        if not _EXIF_ORIENTATION and "exif" in im.info and self.decoder != "device":
            return False
        if self.decoder == "auto" and self.min_size and im.format == "JPEG":  # draft mode: JPEG only, not MPO
            return min(im.width // self.min_size, im.height // self.min_size) < PILLOW_DRAFT_SCALE
        return True


def _find_decode_jpeg() -> tuple[Callable | None, bool]:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision without image IO (removed in a future release): Pillow decodes
        return None, False
    exif = "apply_exif_orientation" in inspect.signature(decode_jpeg).parameters
    kwargs = {"mode": ImageReadMode.RGB, **({"apply_exif_orientation": True} if exif else {})}
    return partial(decode_jpeg, **kwargs), exif


_decode_jpeg, _EXIF_ORIENTATION = _find_decode_jpeg()


def _torchvision_decode(data: bytes) -> torch.Tensor | None:
    """RGB uint8 CHW pixels with EXIF orientation applied, or None where torchvision refuses the file."""
    assert _decode_jpeg is not None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
            return _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except RuntimeError:  # truncated, corrupt, unsupported: Pillow decodes it or records its own error
        return None


def tensor_transform(transform: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The uint8-tensor twin of timm's eval transform (``create_transform(..., normalize=False)``).

    Replays its steps (``Resize`` and ``ResizeKeepRatio`` with bilinear or bicubic, antialiased
    as Pillow always is; ``CenterCrop``; ``CenterCropOrPad`` of crop_mode="border"; the final
    to-tensor) with the same sizes; None for any other step, so that transform stays on Pillow.
    """
    from timm.data.transforms import CenterCropOrPad, MaybePILToTensor, ResizeKeepRatio
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if not isinstance(transform, T.Compose) or _pillow_vertical_first() is None:
        return None
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    replayed = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    for t in transform.transforms:
        if type(t) is T.Resize:
            if t.interpolation not in replayed or t.max_size is not None:
                return None
            steps.append(partial(_resize, size=t.size, interpolation=t.interpolation))
        elif isinstance(t, ResizeKeepRatio):
            if t.interpolation not in replayed or t.random_scale_prob or t.random_aspect_prob:
                return None
            steps.append(partial(_resize_keep_ratio, t))
        elif type(t) is T.CenterCrop:
            steps.append(partial(F.center_crop, output_size=list(t.size)))
        elif isinstance(t, CenterCropOrPad):
            if t.padding_mode != "constant":
                return None
            steps.append(partial(_center_crop_or_pad, size=t.size, fill=t.fill))
        elif type(t) in (MaybePILToTensor, T.PILToTensor):
            continue
        else:
            return None
    return partial(_run, steps)


def _run(steps: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        x = step(x)
    return x


def _resize_keep_ratio(t: Any, x: torch.Tensor) -> torch.Tensor:
    return _resize(x, t.get_params(x, t.size, t.longest), t.interpolation)  # timm's own arithmetic


def _resize(x: torch.Tensor, size: int | list[int] | tuple[int, ...], interpolation: Any) -> torch.Tensor:
    """torchvision's ``Resize(size)`` of a PIL image, on a uint8 CHW tensor, to Pillow's pixels.

    The output size is torchvision's (an int or ``[s]``: the shorter side to ``s``, the longer one
    truncated). The antialiased uint8 kernel computes Pillow's filter passes, horizontal then
    vertical, each rounded to uint8; where Pillow runs the vertical pass first (see
    ``_pillow_vertical_first``) the two passes are made in that order here too.
    """
    from torchvision.transforms.v2 import functional as F

    H, W = x.shape[-2:]
    if isinstance(size, int) or len(size) == 1:
        s = size if isinstance(size, int) else size[0]
        h, w = (int(s * H / W), s) if W <= H else (s, int(s * W / H))
    else:
        h, w = size
    if (h, w) == (H, W):
        return x
    if _pillow_vertical_first() and w != W and h < H and H - h > 2 * (W - w):
        x = F.resize(x, [h, W], interpolation=interpolation, antialias=True)
    return F.resize(x, [h, w], interpolation=interpolation, antialias=True)


_PASS_ORDER: list[bool | None] = []


def _pillow_vertical_first() -> bool | None:
    """Which pass Pillow's resize runs first, read from this Pillow (tiny resizes, once per process).

    Pillow up to 12 runs the horizontal pass first; Pillow 13 runs the vertical one first when the
    height loses more than twice the pixels the width loses (python-pillow/Pillow#9549; the rule as
    read from Pillow 13.0's pixels, 600 random resizes out of 600). Each pass rounds to uint8, so the
    order shows in the pixels. True: that rule; False: always horizontal; None: neither (another
    rule), and then the tensor path is not used.
    """
    if not _PASS_ORDER:
        im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 12), dtype=np.uint8))

        def order(h: int, w: int) -> str:
            one = np.asarray(im.resize((w, h), Image.Resampling.BICUBIC))
            hv = np.asarray(im.resize((w, 40), Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC))
            vh = np.asarray(im.resize((12, h), Image.Resampling.BICUBIC).resize((w, h), Image.Resampling.BICUBIC))
            return "h" if (one == hv).all() and not (one == vh).all() else "v" if (one == vh).all() else "?"

        seen = (order(10, 10), order(20, 2), order(19, 2))  # 30 > 4: v; 20 > 20: h; 21 > 20: v
        _PASS_ORDER.append({("v", "h", "v"): True, ("h", "h", "h"): False}.get(seen))
    return _PASS_ORDER[0]


def _center_crop_or_pad(x: torch.Tensor, size: tuple[int, int], fill: Any) -> torch.Tensor:
    """timm's ``center_crop_or_pad`` for uint8 tensors with a per-channel fill (torchvision pads tensors
    with one value only): pad to at least ``size`` with ``fill``, then crop the centre."""
    ch, cw = size
    c, h, w = x.shape
    if cw > w or ch > h:
        out = torch.empty((c, max(h, ch), max(w, cw)), dtype=x.dtype, device=x.device)
        out[:] = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        out[:, top:top + h, left:left + w] = x
        x, h, w = out, out.shape[1], out.shape[2]
        if (h, w) == (ch, cw):
            return x
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[:, top:top + ch, left:left + cw]
