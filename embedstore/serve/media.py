"""The images of store rows, as a server sends them: the file itself or a JPEG thumbnail.

Only files inside the collection root are sent: a row's stored path is resolved (symlinks
followed) and refused unless it stays under the root; absolute paths outside it, folders,
devices and files over the byte cap are refused too. A server never opens a path a request
names, only paths the store holds. Thumbnails are kept in a small in-memory cache keyed by the
row's content hash.

Crash safety: nothing here writes a file.
"""
from __future__ import annotations

import io
import mimetypes
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..data.collection import MAX_FILE_BYTES as MAX_IMAGE_BYTES  # the collection reader's cap on one file
from ..data.items import is_url
from ..errors import MediaError
from ..store import Store


@dataclass(frozen=True)
class RowImage:
    """A row's image file on this machine, checked to lie inside the collection root."""

    row: int
    path: str  # as stored
    file: str  # resolved, absolute
    hash: str

    @property
    def media_type(self) -> str:
        return mimetypes.guess_type(self.file)[0] or "application/octet-stream"


def row_image(st: Store, row: int) -> RowImage:
    """The image of store row ``row``; MediaError (404 or 403) naming why it cannot be sent."""
    check_row(st, row)
    rows = np.array([row], np.int64)
    stored = str(st.image_column("path", rows)[0])
    digest = str(st.image_column("hash", rows)[0])
    if is_url(stored) or ".tar/" in stored.lower():
        kind = "a URL" if is_url(stored) else "a member of a tar shard"
        raise MediaError(f"row {row}'s image {stored} is {kind}: the server sends image files only (the page shows "
                         "the path instead)")
    if not st.root:
        raise MediaError(f"{st.path} records no collection root, so no image file is served", 403)
    root = os.path.realpath(st.root)
    real = os.path.realpath(st.abspath(stored))
    if os.path.commonpath([root, real]) != root:
        raise MediaError(f"row {row}'s image {stored} lies outside the collection root {st.root}: "
                         "only files inside the root are served", 403)
    try:
        info = os.stat(real)
    except OSError:
        raise MediaError(f"row {row}'s image {real} is no longer on disk (moved or deleted since it was embedded)") from None
    import stat

    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_IMAGE_BYTES:
        raise MediaError(f"row {row}'s image {real} is not a regular image file under {MAX_IMAGE_BYTES >> 20} MiB", 403)
    return RowImage(row, stored, real, digest)


def check_row(st: Store, row: int) -> None:
    """MediaError (404) unless ``row`` is a row of the store's images table."""
    if not 0 <= row < st.n_images:
        raise MediaError(f"row {row} is not in {st.path}: rows are 0 to {st.n_images - 1}")


class Thumbnails:
    """JPEG thumbnails of row images, the most recent ``capacity`` kept in memory."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image: RowImage, size: int) -> bytes:
        key = (image.file, image.hash, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = _thumbnail(image, size)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data


def _thumbnail(image: RowImage, size: int) -> bytes:
    from PIL import Image

    from ..data.reader import decode_image

    try:
        with open(image.file, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
        im = decode_image(data, size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MediaError(f"row {image.row}'s image {image.file} cannot be read ({e})", 422) from None
    im.thumbnail((size, size))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85)
    return out.getvalue()
