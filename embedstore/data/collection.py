"""Listing a collection: a folder (recursive, ImageFolder labels) or a CSV list of images.

Imports no torch, so a run that finds nothing new stays fast. Folder collections do not follow
symlinks out of their root unless asked to (such entries are listed as refused items, which
the reader records as failures). CSV lists: header row by column names, UTF-8 BOM dropped,
URLs refused. An empty collection is an error. Crash safety: this module only reads.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..errors import CollectionError, MissingImageError

SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

# Refuse files larger than this before reading them (a documented limit: --max-file-size).
MAX_FILE_BYTES = 256 << 20

CSV_PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "image", "image_path")
CSV_LABEL_COLUMNS = ("label", "class")
CSV_SPLIT_COLUMNS = ("split",)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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
    refusal: str = ""  # set by discovery for an entry the reader must refuse (recorded as a failure)


def discover(source: str | os.PathLike, follow_symlinks: bool = False) -> tuple[str, list[ImageItem]]:
    """List the images of a folder (recursive, ImageFolder labels) or of a CSV list.

    Folder layout: ``<class>/img`` gives the label; ``<split>/<class>/img`` when the first
    level is train/val/test. A symlink (file or folder) leading outside the folder is not
    followed unless ``follow_symlinks``; it is listed as a refused item (a recorded failure).
    CSV: ``path[,label[,split]]`` per row, paths relative to the CSV's folder, or a header row
    naming the columns (path/filepath/file/image/image_path, label/class, split); URLs are
    refused. Returns the root and the items, sorted by path. Raises CollectionError when the
    collection lists no image.
    """
    src = Path(source)
    if not src.exists():
        raise CollectionError(f"{src} does not exist: pass a folder of images or a CSV list (path[,label[,split]])")
    if src.is_dir():
        root = str(src.resolve())
        items = _discover_folder(root, follow_symlinks)
        if not items:
            raise CollectionError(f"{src}: no images found (no file with an image extension such as .jpg or .png "
                                  "under it): pass a folder of images or a CSV list")
        return root, items
    if src.suffix.lower() in (".csv", ".txt", ".tsv"):
        root = str(src.resolve().parent)
        items = _discover_csv(src, root)
        if not items:
            raise CollectionError(f"{src}: no images listed (the list is empty or holds only a header or comments): "
                                  "list one image per row, path[,label[,split]]")
        return root, items
    raise CollectionError(f"{src} is neither a folder nor a .csv list")


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
            out.extend(ImageItem(it.path, str(p / it.rel), it.label, it.split) for it in discover(p)[1])
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
                items.append(ImageItem(full, rel, *_layout_labels(rel), refusal=_outside_message("folder", full, root)))
        dirnames[:] = kept
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            # only a symlink can lead out: every folder walked here resolves inside the root already
            outside = not follow_symlinks and os.path.islink(full) and not _inside(os.path.realpath(full), root)
            items.append(ImageItem(full, rel, *_layout_labels(rel),
                                   refusal=_outside_message("file", full, root) if outside else ""))
    items.sort(key=lambda it: it.rel)
    return items


def _outside_message(kind: str, path: str, root: str) -> str:
    return (f"symlinked {kind} leads outside the collection root {root} (to {os.path.realpath(path)}): "
            "not followed; pass --follow-symlinks (follow_symlinks=True) to include it")


def _layout_labels(rel: str) -> tuple[str, str]:
    parts = Path(rel).parts[:-1]
    if parts and parts[0].lower() in SPLITS:
        return (parts[1] if len(parts) > 1 else ""), SPLITS[parts[0].lower()]
    return (parts[0] if parts else ""), ""


def _discover_csv(src: Path, root: str) -> list[ImageItem]:
    try:
        return _read_csv(src, root)
    except UnicodeDecodeError as e:
        raise CollectionError(f"{src} is not UTF-8 text (byte {e.start}): save the list as UTF-8 CSV") from None
    except csv.Error as e:
        raise CollectionError(f"{src} is not a readable CSV list ({e}): write one path[,label[,split]] per row") from None
    except OSError as e:
        raise CollectionError(f"cannot read {src} ({e.strerror or type(e).__name__}): check that it is a readable "
                              "CSV file") from None


def _read_csv(src: Path, root: str) -> list[ImageItem]:
    items = []
    columns: tuple[int, int | None, int | None] | None = None  # path, label, split column indices
    with open(src, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a leading BOM is dropped
        dialect = csv.excel_tab if src.suffix.lower() == ".tsv" else csv.excel
        reader = csv.reader(f, dialect)
        for row in reader:
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            if columns is None:
                columns = _csv_header(src, root, row)
                if columns is not None:
                    continue  # the header row
                columns = (0, 1, 2)
            path = _cell(row, columns[0])
            if not path:
                continue
            if "\x00" in path:
                raise csv.Error(f"line {reader.line_num} holds a NUL byte")
            if _URL.match(path):
                raise CollectionError(f"{src}, line {reader.line_num}: {path} is a URL; URLs are not supported yet: "
                                      "download the images and list their local paths instead")
            label = _cell(row, columns[1])
            split = _cell(row, columns[2])
            split = SPLITS.get(split.lower(), split)
            full = path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))
            rel = os.path.relpath(full, root) if _inside(full, root) else full
            items.append(ImageItem(full, rel, label, split))
    return items


def _cell(row: list[str], index: int | None) -> str:
    return row[index].strip() if index is not None and index < len(row) else ""


def _csv_header(src: Path, root: str, row: list[str]) -> tuple[int, int | None, int | None] | None:
    """Column indices when ``row`` is a header (known names, first cell not a file), else None."""
    names = [c.strip().lower() for c in row]
    known = CSV_PATH_COLUMNS + CSV_LABEL_COLUMNS + CSV_SPLIT_COLUMNS
    if names[0] not in known or os.path.exists(os.path.join(root, row[0].strip())):
        return None

    def find(options: tuple[str, ...]) -> int | None:
        return next((i for i, n in enumerate(names) if n in options), None)

    path = find(CSV_PATH_COLUMNS)
    if path is None:
        raise CollectionError(f"{src}: the header row ({','.join(row)}) names no path column: name it one of "
                              f"{', '.join(CSV_PATH_COLUMNS)}")
    return path, find(CSV_LABEL_COLUMNS), find(CSV_SPLIT_COLUMNS)


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), root]) == root
