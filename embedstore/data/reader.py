"""Reading images: decode files robustly (discovery of a collection lives in ``collection``).

The reader stage of the pipeline. Every failure is returned as data (error type and message),
never raised, so one bad file cannot stop a run. The reader opens only regular files, without
blocking (a FIFO swapped in cannot hang it), and reads at most ``max_bytes`` of each; an entry
that discovery refused (a symlink out of the root) is recorded as a failure. Crash safety: this
module only reads; it writes nothing.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .._hashing import hash_bytes
from ..errors import EmptyFileError, FileTooLargeError, NotRegularFileError, OutsideRootError
from .collection import MAX_FILE_BYTES, ImageItem

# Refuse decompression bombs by pixel count (Pillow's limit), before any pixel is decoded.
MAX_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode bytes to an RGB image: EXIF orientation applied, JPEG draft mode for large photos.

    ``min_size`` lets JPEG decoding skip detail (DCT scaling) while keeping both sides at least
    that many pixels. Raises on corrupt, truncated, non-image and over-large (bomb) input.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > MAX_PIXELS:
                raise Image.DecompressionBombWarning(f"{im.width}x{im.height} pixels")
            if min_size and im.format == "JPEG":
                im.draft("RGB", (min_size, min_size))
            im = ImageOps.exif_transpose(im)
        except UnidentifiedImageError:  # Pillow's message names the BytesIO object, not the file
            raise UnidentifiedImageError("cannot identify image file (not an image Pillow can read)") from None
        except Image.DecompressionBombWarning as w:
            raise Image.DecompressionBombError(
                f"refused: {w} exceeds the limit of {MAX_PIXELS} pixels (possible decompression bomb)"
            ) from None
        return to_rgb(im)


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


@dataclass
class ReadResult:
    """The reader's output for one item: pixels or an error, plus the file facts."""

    index: int
    pixels: torch.Tensor | None
    size: int = 0
    mtime: float = 0.0
    hash: str = ""
    error: str = ""
    message: str = ""


class ImageReader(torch.utils.data.Dataset):
    """Reads, hashes, decodes and transforms items; failures come back as results, not exceptions."""

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[Image.Image], Any], min_size: int | None,
                 max_bytes: int = MAX_FILE_BYTES):
        self.items = items
        self.transform = transform
        self.min_size = min_size
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ReadResult:
        item = self.items[index]
        result = ReadResult(index, None)
        try:
            data = read_file(item, self.max_bytes, result)
            result.hash = hash_bytes(data)
            if not data:
                raise EmptyFileError("empty file (0 bytes): nothing to decode")
            pixels = self.transform(decode_image(data, self.min_size))
            result.pixels = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
        except Exception as e:  # noqa: BLE001 - a bad file is data, not a crash
            result.error, result.message = type(e).__name__, str(e)[:500] or type(e).__name__
        return result


def read_file(item: ImageItem, max_bytes: int, result: ReadResult) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``result`` gets its size and mtime.

    Refusals raise before any byte is read: a discovery refusal, anything but a regular file
    (FIFO, device, socket, folder), a file over the limit. The open never blocks (O_NONBLOCK)
    and the opened descriptor is checked again, so a FIFO swapped in meanwhile is refused too.
    """
    st = os.stat(item.path)
    result.size, result.mtime = st.st_size, st.st_mtime
    if item.refusal:
        raise OutsideRootError(item.refusal)
    _check_file(st, max_bytes)
    fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        result.size, result.mtime = st.st_size, st.st_mtime
        _check_file(st, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(f"grew past the limit of {max_bytes} bytes while being read")
    return data


def _check_file(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for k, test in (("a FIFO", stat.S_ISFIFO), ("a character device", stat.S_ISCHR),
                                        ("a block device", stat.S_ISBLK), ("a socket", stat.S_ISSOCK),
                                        ("a folder", stat.S_ISDIR)) if test(st.st_mode)), "not a regular file")
        raise NotRegularFileError(f"refused: {kind}, not a regular file (only image files are read)")
    if st.st_size > max_bytes:
        raise FileTooLargeError(f"refused: {st.st_size} bytes exceeds the limit of {max_bytes} bytes "
                                "(raise it with --max-file-size / max_bytes)")


def collate(results: list[ReadResult]) -> tuple[list[ReadResult], torch.Tensor | None]:
    """Batch the decodable results into one uint8 tensor; failed ones ride along without pixels."""
    good = [r.pixels for r in results if r.pixels is not None]
    batch = torch.stack(good) if good else None
    for r in results:
        r.pixels = None
    return results, batch


def draft_size(data_config: dict[str, Any]) -> int:
    """Smallest side the eval transform resizes to (decoding below it would lose detail)."""
    side = int(data_config["input_size"][-1])
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    return int(np.ceil(side / crop_pct))
