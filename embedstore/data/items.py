"""The items of a collection: ``ImageItem`` (one image, its key, where its bytes are), ``ByteSource``
(what reads bytes that are not a local file) and the small rules every discoverer shares.

Imports no torch and no other module of ``data/``: the discoverers (:mod:`.collection`, :mod:`.tars`,
:mod:`.tables`, :mod:`.hf`) and byte sources (:mod:`.remote`) build on it. Crash safety: definitions only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

# Refuse files larger than this before reading them (a documented limit: --max-file-size).
MAX_FILE_BYTES = 256 << 20

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    """Whether ``text`` starts with a URL scheme (``http://``, ``s3://``, ``file://``, ...)."""
    return bool(_URL.match(text))


def image_extensions() -> set[str]:
    """File extensions of every format Pillow can open here."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


@dataclass(frozen=True)
class ImageItem:
    """One image of a collection: where it is, its key in the store and what the layout says about it.

    ``path``: the absolute path of a file (of the tar shard holding a member), a URL, or a dataset
    row's key. ``rel``: the key stored (the path relative to the collection root when inside it;
    ``<shard rel>/<member name>`` for a tar member; the URL as listed; the dataset key). ``stat``:
    (size, mtime) known without ``os.stat`` (a tar header, a dataset row), used by planning.
    ``source``: what reads the bytes when they are not a local file (see :class:`ByteSource`), and
    ``locator`` where they are inside it (a member's offset and size, a dataset's row).
    """

    path: str
    rel: str
    label: str = ""
    split: str = ""
    refusal: str = ""  # set by discovery for an entry the reader must refuse (recorded as a failure)
    stat: tuple[int, float] | None = None
    locator: tuple = ()
    source: Any = field(default=None, compare=False, repr=False)


class ByteSource:
    """What an item's bytes come from when they are not a local file: a discoverer's reader.

    ``read(item, max_bytes)`` returns the bytes or raises (a refusal, a file over ``max_bytes``, a
    download that failed: the reader records it as the item's failure); ``read_many(items,
    max_bytes)`` may read several at once (bytes or the exception, per item); ``rekey(item, root)``
    is the item's key relative to another root (None: the key does not depend on the root).
    """

    def read(self, item: ImageItem, max_bytes: int) -> bytes:
        raise NotImplementedError

    def read_many(self, items: Sequence[ImageItem], max_bytes: int) -> list[bytes | Exception]:
        out: list[bytes | Exception] = []
        for it in items:
            try:
                out.append(self.read(it, max_bytes))
            except Exception as e:  # noqa: BLE001 - returned as data, recorded by the reader
                out.append(e)
        return out

    def rekey(self, item: ImageItem, root: str) -> str | None:
        return None


def relative_key(path: str, root: str) -> str:
    """A file's key under ``root``: its path relative to the root, or the absolute path when outside it."""
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def layout_labels(rel: str) -> tuple[str, str]:
    """(label, split) from a path's folders: ``<class>/img``, ``<split>/<class>/img`` (train/val/test)."""
    parts = Path(rel).parts[:-1]
    if parts and parts[0].lower() in SPLITS:
        return (parts[1] if len(parts) > 1 else ""), SPLITS[parts[0].lower()]
    return (parts[0] if parts else ""), ""
