"""Reading images: discover a collection (folder or CSV list), decode files robustly.

The reader stage of the pipeline. Every failure is returned as data (error type and message),
never raised, so one bad file cannot stop a run.
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import CollectionError

SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

# Refuse decompression bombs by pixel count (Pillow's limit), before any pixel is decoded.
MAX_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False


def image_extensions() -> set[str]:
    """File extensions of every format Pillow can open here."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


@dataclass(frozen=True)
class ImageItem:
    """One image of a collection: where it is and what the layout says about it."""

    path: str  # absolute path
    rel: str  # path as stored: relative to the collection root when inside it
    label: str = ""
    split: str = ""


def discover(source: str | os.PathLike) -> tuple[str, list[ImageItem]]:
    """List the images of a folder (recursive, ImageFolder labels) or of a CSV list.

    Folder layout: ``<class>/img`` gives the label; ``<split>/<class>/img`` when the first
    level is train/val/test. CSV: ``path[,label[,split]]`` per row, an optional header row,
    paths relative to the CSV's folder. Returns the root and the items, sorted by path.
    """
    src = Path(source)
    if not src.exists():
        raise CollectionError(f"{src} does not exist: pass a folder of images or a CSV list (path[,label[,split]])")
    if src.is_dir():
        root = str(src.resolve())
        return root, _discover_folder(root)
    if src.suffix.lower() in (".csv", ".txt", ".tsv"):
        root = str(src.resolve().parent)
        return root, _discover_csv(src, root)
    raise CollectionError(f"{src} is neither a folder nor a .csv list")


def _discover_folder(root: str) -> list[ImageItem]:
    exts = image_extensions()
    items: list[ImageItem] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop or a folder reached twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            items.append(ImageItem(full, rel, *_layout_labels(rel)))
    items.sort(key=lambda it: it.rel)
    return items


def _layout_labels(rel: str) -> tuple[str, str]:
    parts = Path(rel).parts[:-1]
    if parts and parts[0].lower() in SPLITS:
        return (parts[1] if len(parts) > 1 else ""), SPLITS[parts[0].lower()]
    return (parts[0] if parts else ""), ""


def _discover_csv(src: Path, root: str) -> list[ImageItem]:
    items = []
    with open(src, newline="", encoding="utf-8") as f:
        dialect = csv.excel_tab if src.suffix.lower() == ".tsv" else csv.excel
        for n, row in enumerate(csv.reader(f, dialect)):
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            if n == 0 and row[0].strip().lower() in ("path", "file", "filename", "image"):
                continue
            path = row[0].strip()
            label = row[1].strip() if len(row) > 1 else ""
            split = SPLITS.get(row[2].strip().lower(), row[2].strip()) if len(row) > 2 else ""
            full = path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))
            rel = os.path.relpath(full, root) if _inside(full, root) else full
            items.append(ImageItem(full, rel, label, split))
    return items


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), root]) == root


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

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[Image.Image], Any], min_size: int | None):
        self.items = items
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ReadResult:
        from .utils import hash_bytes

        item = self.items[index]
        result = ReadResult(index, None)
        try:
            with open(item.path, "rb") as f:
                st = os.fstat(f.fileno())
                result.size, result.mtime = st.st_size, st.st_mtime
                data = f.read()
            result.hash = hash_bytes(data)
            if not data:
                raise ValueError("empty file (0 bytes)")
            pixels = self.transform(decode_image(data, self.min_size))
            result.pixels = torch.as_tensor(np.asarray(pixels)) if not isinstance(pixels, torch.Tensor) else pixels
        except Exception as e:  # noqa: BLE001 - a bad file is data, not a crash
            result.error, result.message = type(e).__name__, str(e)[:500] or type(e).__name__
        return result


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
