"""Thumbnails of a report: small JPEGs as ``data:`` URIs, one per store row.

Trust rule: a row's thumbnail is made only from a file whose bytes still match the BLAKE2b hash
recorded for that row when it was embedded. A store received from someone else may name any local
file (an absolute path, ``../`` out of the root); such a file, or one changed since embedding, gets
the placeholder, so a report never shows what the store did not embed. The bytes are read once,
then hashed and decoded from memory (no window between the check and the use). Tar members are read
from their shard (:mod:`embedstore.data.stored`); URLs are never fetched for a report (placeholder).

Crash-safety: read-only; nothing here writes a file.
"""
from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ..data.items import MAX_FILE_BYTES, ImageItem
from ..data.stored import stored_items
from ..store import Store
from .._hashing import hash_bytes

MISSING, CHANGED = "missing", "changed"
MAX_THUMB_SOURCE_BYTES = MAX_FILE_BYTES  # a tar member larger than this gets the placeholder


def thumbnail_from_bytes(data: bytes, px: int) -> bytes | None:
    """A small JPEG of an encoded image, or None when it cannot be decoded."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (2 * px, 2 * px))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=75, optimize=True)
            return buf.getvalue()
    except Exception:  # any undecodable file gets the placeholder; one bad file must not stop a report
        return None


def thumbnail_jpeg(path: str, px: int) -> bytes | None:
    """A small JPEG of an image file (not checked against any hash: for files you chose), or None."""
    try:
        with open(path, "rb") as f:
            return thumbnail_from_bytes(f.read(), px)
    except OSError:
        return None


def verified_thumbnail(path: str | ImageItem, expected_hash: str, px: int) -> tuple[bytes | None, str | None]:
    """(JPEG, None) for a readable file (or tar member: an item of :func:`embedstore.data.stored.stored_items`)
    whose content hash is ``expected_hash``; else (None, why). A URL is never fetched: missing."""
    try:
        if isinstance(path, ImageItem) and (path.refusal or path.source is not None):
            if path.refusal:
                return None, MISSING
            data = path.source.read(path, MAX_THUMB_SOURCE_BYTES)
        else:
            with open(path.path if isinstance(path, ImageItem) else path, "rb") as f:
                data = f.read()
    except Exception:  # noqa: BLE001 - unreadable (gone, a damaged shard): the placeholder
        return None, MISSING
    if not expected_hash or hash_bytes(data) != expected_hash:
        return None, CHANGED
    jpeg = thumbnail_from_bytes(data, px)
    return (jpeg, None) if jpeg is not None else (None, MISSING)


def placeholder_jpeg(px: int) -> bytes:
    """A grey square with a cross: stands for an image file that is missing, unreadable or changed."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (px, px), (225, 225, 225))
    d = ImageDraw.Draw(im)
    d.line([(8, 8), (px - 9, px - 9)], fill=(160, 160, 160), width=3)
    d.line([(8, px - 9), (px - 9, 8)], fill=(160, 160, 160), width=3)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=75)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class Thumbnails:
    """Data URIs of store rows' thumbnails, made once per row (in threads: Pillow and hashlib release the GIL)."""

    WHY = {MISSING: " (image file missing or unreadable)",
           CHANGED: " (file differs from the one embedded: not shown)"}

    def __init__(self, st: Store, px: int) -> None:
        self.st, self.px = st, px
        self.uris: dict[int, str] = {}
        self.paths: dict[int, str] = {}  # the stored path of each row with a thumbnail
        self.missing: set[int] = set()
        self.changed: set[int] = set()
        self._placeholder = data_uri(placeholder_jpeg(px))

    def add(self, rows: Sequence[int]) -> None:
        """Make the thumbnails of ``rows`` not made yet (their paths and hashes read for those rows only)."""
        todo = list(dict.fromkeys(int(r) for r in rows if int(r) not in self.uris))
        if not todo:
            return
        paths, hashes = self.st.image_column("path", todo), self.st.image_column("hash", todo)
        jobs = list(zip(stored_items(self.st.root, [str(p) for p in paths]), map(str, hashes)))
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            done = pool.map(lambda job: verified_thumbnail(job[0], job[1], self.px), jobs)
            for row, path, (jpeg, why) in zip(todo, paths, done):
                if why == CHANGED:
                    self.changed.add(row)
                elif why == MISSING:
                    self.missing.add(row)
                self.uris[row] = self._placeholder if jpeg is None else data_uri(jpeg)
                self.paths[row] = str(path)

    def img(self, row: int, caption: str = "") -> dict[str, Any]:
        """What the template's ``img`` macro needs: src, alt (the path), title, and whether it is a placeholder."""
        self.add([row])
        path = self.paths[row]
        why = CHANGED if row in self.changed else MISSING if row in self.missing else None
        return {"src": self.uris[row], "alt": path, "title": path + (self.WHY[why] if why else "") + caption,
                "missing": why is not None}

    def notes(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} image file(s) missing or unreadable: shown as placeholders")
        if self.changed:
            out.append(f"{len(self.changed)} image file(s) no longer match the content hash recorded when they "
                       "were embedded (changed since, or the store's paths name other files): shown as "
                       "placeholders; re-run `embedstore embed` on the collection to refresh them")
        return out
