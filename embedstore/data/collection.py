"""Listing a collection as ``ImageItem``s: a folder, a tar shard, a table (CSV, Parquet) or a dataset.

Folders are walked recursively (ImageFolder labels); the ``.tar`` shards met there (or given) are
listed by :mod:`.tars`, tables by :mod:`.tables`, Hugging Face datasets by :mod:`.hf`. An item says
where its bytes are: a local file (``source`` None), or a byte source (a tar shard, a URL fetcher,
a dataset's rows) that the reader asks for them. Imports no torch, so a run that finds nothing new
stays fast. Folder collections do not follow symlinks out of their root unless asked to (such
entries are listed as refused items, which the reader records as failures). An empty collection
is an error. Crash safety: this module only reads.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import CollectionError, EmbedOptionError, MissingImageError
from . import tars
from .hf import discover_dataset, is_dataset
from .items import (MAX_FILE_BYTES, SPLITS, ByteSource, ImageItem, image_extensions, is_url,  # noqa: F401 (re-exported)
                    layout_labels, relative_key)
from .remote import file_url_path
from .tables import discover_table

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")


def discover(source: str | os.PathLike | Any, follow_symlinks: bool = False, *,
             columns: Mapping[str, str] | None = None, fetch: Any = None) -> tuple[str, list[ImageItem]]:
    """List the images of a folder, a tar shard, a CSV/Parquet table or a Hugging Face dataset.

    Folder layout: ``<class>/img`` gives the label; ``<split>/<class>/img`` when the first
    level is train/val/test; every ``.tar`` under it is read as a webdataset shard too (:mod:`.tars`).
    A symlink (file or folder) leading outside the folder is not followed unless
    ``follow_symlinks``; it is listed as a refused item (a recorded failure). A ``.tar``: its image
    members. A table (``.csv``/``.tsv``/``.txt``/``.parquet``, a local path or an fsspec URL): rows
    of paths or URLs (:mod:`.tables`; ``columns={"path": ..., "label": ..., "split": ...}`` names
    its columns; ``fetch``, a :class:`.remote.Fetch`, how URLs are downloaded). A
    ``datasets.Dataset``: its Image column (:mod:`.hf`; ``columns`` keys image, label, split, key).
    Returns the root and the items, sorted by key. Raises CollectionError when the collection
    lists no image.
    """
    if is_dataset(source):
        return discover_dataset(source, columns)
    if not isinstance(source, (str, os.PathLike)):
        raise CollectionError(f"{type(source).__name__} is not a collection: pass a folder, a .tar shard, a "
                              "CSV/Parquet table (a path or URL) or a datasets.Dataset")
    text = os.fspath(source)
    suffix = Path(text.rsplit("/", 1)[-1]).suffix.lower()
    if is_url(text) and not text.lower().startswith("file://"):
        if suffix not in TABLE_SUFFIXES:
            raise CollectionError(f"{text}: a collection given by URL must be a table (.csv, .tsv, .txt, .parquet)")
        return discover_table(text, columns, fetch)
    src = Path(file_url_path(text) if text.lower().startswith("file://") else text)
    if not src.exists():
        raise CollectionError(f"{src} does not exist: pass a folder of images, a .tar shard, or a CSV/Parquet "
                              "table (path[,label[,split]])")
    if columns and (src.is_dir() or suffix not in TABLE_SUFFIXES):
        raise EmbedOptionError(f"columns={dict(columns)!r} (--path-column, ...) apply to tables and datasets, "
                               f"not to {src}")
    if src.is_dir():
        root = str(src.resolve())
        items = _discover_folder(root, follow_symlinks)
        if not items:
            raise CollectionError(f"{src}: no images found (no file with an image extension such as .jpg or .png, "
                                  "and no .tar shard, under it): pass a folder of images or a CSV list")
        return root, items
    tars.check_single_shard(text)
    if tars.is_shard(text):
        root, full = str(src.resolve().parent), str(src.resolve())
        items = tars.list_shard(full, src.name)
        if not any(not it.refusal for it in items):
            raise CollectionError(items[-1].refusal if items else
                                  f"{src}: no images in the shard (no member with an image extension)")
        return root, items
    if suffix in TABLE_SUFFIXES:
        return discover_table(str(src), columns, fetch)
    raise CollectionError(f"{src} is neither a folder, a .tar shard, nor a table (.csv, .tsv, .txt, .parquet)")


def expand_images(sources: Sequence[str | os.PathLike], what: str = "image") -> list[ImageItem]:
    """The images named by ``sources`` (image files, and folders searched recursively as :func:`discover`
    lists them), in order: ``path`` absolute, ``rel`` the name to show (the file as given, or the folder
    as given joined with the image's path inside it). Every listed file is returned, refusals cleared: the
    reader decides what it can decode. Raises :class:`MissingImageError` (a CollectionError and a
    FileNotFoundError whose ``filename`` is the path) for a path that does not exist or when none is
    given, and discovery's CollectionError for a folder without images; ``what`` names them in messages.
    """
    out: list[ImageItem] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            out.extend(replace(it, rel=str(p / it.rel), refusal=it.refusal if it.source is not None else "")
                       for it in discover(p)[1])
        elif p.exists():
            out.append(ImageItem(os.path.abspath(p), str(src)))
        else:
            raise MissingImageError(f"{what} {src} does not exist: pass image files or folders of images", str(src))
    if not out:
        exts = ", ".join(sorted(image_extensions())[:8])
        raise MissingImageError(f"no {what}s in {', '.join(map(str, sources)) or 'an empty list'} "
                                f"(looked for {exts}, ...): pass image files or folders of images")
    return out


def _discover_folder(root: str, follow_symlinks: bool = False) -> list[ImageItem]:
    exts = image_extensions()
    items: list[ImageItem] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop or a folder reached twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full = os.path.join(dirpath, d)
            if follow_symlinks or _inside(os.path.realpath(full), root):
                kept.append(d)
            else:  # listed once, as a refused entry, instead of walking a tree outside the root
                rel = os.path.relpath(full, root)
                items.append(ImageItem(full, rel, *layout_labels(rel), refusal=_outside_message("folder", full, root)))
        dirnames[:] = kept
        for name in filenames:
            shard, compressed = tars.is_shard(name), tars.is_compressed_shard(name)
            if name.startswith(".") or not (shard or compressed or os.path.splitext(name)[1].lower() in exts):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            # only a symlink can lead out: every folder walked here resolves inside the root already
            outside = not follow_symlinks and os.path.islink(full) and not _inside(os.path.realpath(full), root)
            refusal = _outside_message("file", full, root) if outside else ""
            if compressed and not refusal:
                items.append(tars.refused_shard(full, rel, tars.compressed_message(full), layout_labels(rel)[1]))
            elif shard and not refusal:
                items.extend(tars.list_shard(full, rel, layout_labels(rel)[1]))
            else:
                items.append(ImageItem(full, rel, *layout_labels(rel), refusal=refusal))
    items.sort(key=lambda it: it.rel)
    return items


def _outside_message(kind: str, path: str, root: str) -> str:
    return (f"symlinked {kind} leads outside the collection root {root} (to {os.path.realpath(path)}): "
            "not followed; pass --follow-symlinks (follow_symlinks=True) to include it")


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), root]) == root
