"""WebDataset-style tar shards: members listed from the tar headers, read by offset, never unpacked.

A shard is an uncompressed ``.tar`` (given alone, or met while a folder is walked). Its members
are grouped webdataset-style: the key is the member path up to the first dot of its base name, the
rest is the extension. A member whose whole extension is an image extension (``x.jpg``, not
``x.seg.png``) is an image; its label is the text of ``x.cls``, else the ``label`` (or ``cls``,
``class``) field of ``x.json``, else the text of ``x.txt``; its split is ``x.json``'s ``split``
field, else the shard's first folder under the collection root when that is train/val/test.
Labels are read while listing (files of at most 1 MiB); an unreadable one makes its image a
refused item. An image's key is ``<shard path relative to the root>/<member name>``.

Listing reads only the tar headers (and the small label files); the reader opens the shard, checks
that it is still the file that was listed (size and mtime), seeks to the member's data and reads its
size, at most ``max_bytes``. Compressed shards (``.tar.gz``, ``.tgz``, ...) cannot be read by offset:
given alone they are refused with an error, in a folder they are recorded as failures; decompress
them (``gunzip shard.tar.gz``) to embed them. A damaged or truncated shard keeps the members whose
data is complete and records the rest as one failure. Crash safety: this module only reads.
"""
from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
from typing import Any

from ..errors import CollectionError, FileTooLargeError, NotRegularFileError, TarShardError
from .items import SPLITS, ByteSource, ImageItem, image_extensions, relative_key

COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.lz4")
MAX_LABEL_BYTES = 1 << 20
LABEL_FIELDS = ("label", "cls", "class")


def is_shard(name: str) -> bool:
    return name.lower().endswith(".tar")


def is_compressed_shard(name: str) -> bool:
    return name.lower().endswith(COMPRESSED)


class TarShards(ByteSource):
    """The byte source of tar members: ``locator`` = (member name, data offset, size, shard size, shard mtime)."""

    def read(self, item: ImageItem, max_bytes: int) -> bytes:
        if item.refusal:
            raise TarShardError(item.refusal)
        name, offset, size, shard_size, shard_mtime = item.locator
        if size > max_bytes:
            raise FileTooLargeError(f"refused: {size} bytes exceeds the limit of {max_bytes} bytes "
                                    "(raise it with --max-file-size / max_bytes)")
        fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFileError(f"refused: the shard {item.path} is not a regular file")
            if (st.st_size, st.st_mtime) != (shard_size, shard_mtime):
                raise TarShardError(f"the shard {item.path} changed since it was listed: run embed again")
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise TarShardError(f"{name}: the shard ends {size - len(data)} bytes before the member's end")
        return data

    def rekey(self, item: ImageItem, root: str) -> str:
        shard = relative_key(item.path, root)
        return shard + "/" + item.locator[0] if item.locator else shard  # a member, or a refused shard


TAR = TarShards()


def refused_shard(path: str, rel: str, message: str, split: str = "") -> ImageItem:
    """One item standing for a whole shard the reader refuses (a failure keyed by the shard's path)."""
    try:
        st = os.stat(path)
        known: tuple[int, float] | None = (st.st_size, st.st_mtime)
    except OSError:
        known = None
    return ImageItem(path, rel, "", split, refusal=message, stat=known, source=TAR)


def compressed_message(path: str) -> str:
    return (f"{path} is a compressed tar shard: members cannot be read by offset from it; decompress it "
            "(e.g. gunzip) and embed the .tar")


def list_shard(path: str, rel: str, split: str = "") -> list[ImageItem]:
    """The image members of the shard at ``path`` (keyed ``rel/<member>``), refusals included."""
    st = os.stat(path)
    shard = (st.st_size, st.st_mtime)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    broken = ""
    try:
        with tarfile.open(path, "r:") as tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, OSError) as e:
                    broken = f"{rel}: damaged after {len(tf.members)} members ({e})"
                    break
                if m is None:
                    break
                if not m.isreg() or m.sparse is not None:
                    continue
                name = _member_name(m.name)
                folder, base = posixpath.split(name)
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                groups.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = m
    except (tarfile.TarError, OSError) as e:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00" or magic[:4] == b"(\xb5/\xfd":
            return [refused_shard(path, rel, compressed_message(path), split)]
        return [refused_shard(path, rel, f"{path} is not a readable tar shard ({e})", split)]
    exts = {e.lstrip(".") for e in image_extensions()}
    items = []
    with open(path, "rb") as f:
        for key, members in groups.items():
            images = [(ext, m) for ext, m in members.items() if ext in exts]
            if not images:
                continue
            label, item_split, refusal = _labels(f, members, shard[0])
            for _, m in images:
                name = _member_name(m.name)
                end = m.offset_data + m.size
                why = refusal or (f"{name}: the shard ends before this member's data ({end} > {shard[0]} bytes)"
                                  if end > shard[0] else "")
                items.append(ImageItem(path, f"{rel}/{name}", label, item_split or split, refusal=why,
                                       stat=(m.size, float(m.mtime)), locator=(name, m.offset_data, m.size, *shard),
                                       source=TAR))
    if broken:
        items.append(refused_shard(path, rel, broken, split))
    return items


def _member_name(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _labels(f: Any, members: dict[str, tarfile.TarInfo], shard_size: int) -> tuple[str, str, str]:
    """(label, split, refusal) from the key's .cls, .json and .txt members."""
    label = split = ""
    texts: dict[str, str] = {}
    for ext in ("cls", "json", "txt"):
        m = members.get(ext)
        if m is None:
            continue
        name = _member_name(m.name)
        if m.size > MAX_LABEL_BYTES:
            return "", "", f"{name} is {m.size} bytes: label files over {MAX_LABEL_BYTES} bytes are not read"
        if m.offset_data + m.size > shard_size:
            return "", "", f"{name}: the shard ends before this label file's data"
        f.seek(m.offset_data)
        try:
            texts[ext] = f.read(m.size).decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            return "", "", f"{name} is not UTF-8 text (byte {e.start})"
    if "json" in texts:
        try:
            meta = json.loads(texts["json"])
        except ValueError as e:
            return "", "", f"{_member_name(members['json'].name)} is not valid JSON ({e})"
        if isinstance(meta, dict):
            label = next((str(meta[k]) for k in LABEL_FIELDS if meta.get(k) not in (None, "")), "")
            raw = str(meta.get("split") or "")
            split = SPLITS.get(raw.lower(), raw)
    label = texts.get("cls") or label or texts.get("txt", "")
    return label, split, ""


def check_single_shard(path: str) -> None:
    """Refuse (CollectionError) a compressed shard given as the collection."""
    if is_compressed_shard(path):
        raise CollectionError(compressed_message(path))
