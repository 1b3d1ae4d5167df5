"""The on-disk layout of a store file: names, encoding of columns and attributes, writing one whole file.

Layout of ``FILE.h5`` (format ``embedstore/2``; ``embedstore/1`` files are read too)::

    attrs                      format, root, uuid, journal_seq, created
    images/path, images/hash   one variable-length string per image, path relative to root
    images/key                 uint64: BLAKE2b-64 of the path (``keys.path_keys``), for lookups
    images/label, images/split int32 codes, -1 = none; the names are the dataset's ``categories`` attribute
    images/size, images/mtime  int64, float64
    spaces/<name>/vectors      (n, dim) float16 by default; chunked (~64 KiB), resizable
    spaces/<name>/rows         (n,) row of each vector in the images table
    spaces/<name>/version      (n,) the journal sequence number at which each vector was written
    spaces/<name>.attrs        backbone, weights_sha256, preprocessing, pooling, dim, generation, ...
    failures/{path,space,error,message,size,mtime}

Beside it: ``FILE.h5.journal/part-NNNNNNNNNN.h5`` (published batches, same layout) and
``FILE.h5.lock`` (the writer's lock). Format 1 stored labels and splits as strings and had no
``key`` or ``version``: readers derive them; the next consolidation writes format 2.

Crash safety: :func:`write_file` builds a small file (a journal part) in memory and publishes it
with ``_atomic.atomic_write_bytes`` (temporary file beside the target, fsync, ``os.replace``, fsync
of the folder), so a file is either absent, the old one, or the complete new one. Large files are
written by ``fold`` into a temporary file, published the same way. Nothing here edits a published file.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from .._atomic import atomic_write_bytes
from ..errors import StoreError
from .keys import path_keys

FORMAT = "embedstore/2"
READABLE = ("embedstore/1", FORMAT)
IMAGE_COLUMNS = ("path", "label", "split", "size", "hash", "mtime")
CATEGORICAL = ("label", "split")
FAILURE_COLUMNS = ("path", "space", "error", "message", "size", "mtime")
_STR_COLUMNS = {"path", "label", "split", "hash", "space", "error", "message"}
VECTOR_CHUNK_BYTES = 1 << 16  # small chunks: reading one row costs one 64 KiB chunk
COLUMN_CHUNK = 1 << 16
IDENTITY = "identity"  # attribute of a space's rows dataset: rows[p] == p for every position p
TALLIES = "tallies"  # images attribute: what `info` counts (store/tallies.py keeps it up to date)
_PART_RE = re.compile(r"^part-(\d{10})\.h5$")

SpaceData = tuple[dict[str, Any], np.ndarray, np.ndarray]  # attrs, rows, vectors


# --------------------------------------------------------------------------- names


def journal_dir(path: str | os.PathLike) -> Path:
    """The folder of published journal parts of the store at ``path``."""
    return Path(str(path) + ".journal")


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the one writer of the store at ``path``."""
    return Path(str(path) + ".lock")


def part_path(path: str | os.PathLike, seq: int) -> Path:
    """The journal part number ``seq`` of the store at ``path``."""
    return journal_dir(path) / f"part-{seq:010d}.h5"


def list_parts(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """Published journal parts of a store, oldest first."""
    jdir = journal_dir(path)
    if not jdir.is_dir():
        return []
    found = []
    for name in os.listdir(jdir):
        m = _PART_RE.match(name)
        if m:
            found.append((int(m.group(1)), jdir / name))
    return sorted(found)


# --------------------------------------------------------------------------- attributes and columns


def decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """HDF5 attributes as Python values (JSON-encoded lists and dicts decoded)."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v[:1] in "[{":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def write_attrs(target: h5py.AttributeManager, attrs: dict[str, Any]) -> None:
    """Store ``attrs`` (None skipped; lists and dicts as JSON)."""
    for k, v in attrs.items():
        if v is None:
            continue
        target[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v


def column_dtype(column: str) -> type:
    """The in-memory type of an images/failures column: ``object`` (str), ``int64`` (size) or ``float64``."""
    return object if column in _STR_COLUMNS else (np.int64 if column == "size" else np.float64)


def encode_categories(values: Sequence[Any], names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """int32 codes of string values ("" or None = -1) and the names, extending ``names`` if given."""
    names = list(names or [])
    known = {n: i for i, n in enumerate(names)}
    codes = np.empty(len(values), dtype=np.int32)
    for j, v in enumerate(values):
        v = "" if v is None else str(v)
        if not v:
            codes[j] = -1
            continue
        i = known.get(v)
        if i is None:
            i = known[v] = len(names)
            names.append(v)
        codes[j] = i
    return codes, names


def decode_categories(codes: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Object array of the names of ``codes`` ("" for -1)."""
    table = np.array(list(names) + [""], dtype=object)
    return table[np.where(codes < 0, len(names), codes)]


def unreadable(path: Path, e: Exception) -> Exception:
    """The error for a store file that h5py cannot read: missing, or damaged (naming the fix)."""
    if not path.exists():
        return FileNotFoundError(str(path))
    return StoreError(
        f"{path} is not a readable embedstore file ({type(e).__name__}: {e}). "
        "Restore it from a backup, or move it aside and run `embedstore embed` again to rebuild it."
    )


def read_attrs(path: Path) -> dict[str, Any]:
    """The file-level attributes of a store file, without reading its arrays."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return decode_attrs(f.attrs)
    except (OSError, KeyError, ValueError) as e:
        raise unreadable(path, e) from e


# --------------------------------------------------------------------------- writing


def chunk_rows(n: int, cap: int) -> int:
    """Chunk length: the whole dataset when small (journal parts stay small), else ``cap``.

    An empty dataset (a main file about to be filled) gets up to 4096 rows: small stores stay small.
    """
    return max(1, min(n, cap)) if n else min(cap, 4096)


def vector_chunk(dim: int, dtype: np.dtype) -> int:
    """Rows per chunk of a vectors dataset (~64 KiB)."""
    return max(1, VECTOR_CHUNK_BYTES // max(1, dim * np.dtype(dtype).itemsize))


def create_columns(group: h5py.Group, columns: Sequence[str], n: int, data: dict[str, Sequence] | None = None,
                   expected: int = 0) -> None:
    """The images (or failures) datasets of ``n`` rows, filled from ``data`` when given (strings encoded).

    ``expected``: the rows an empty dataset is about to receive (its chunk size follows).
    """
    chunk = chunk_rows(n or expected, COLUMN_CHUNK)
    for c in columns:
        values = None if data is None else data[c]
        if c in CATEGORICAL and columns == IMAGE_COLUMNS:
            codes, names = encode_categories(values if values is not None else [])
            ds = group.create_dataset(c, data=codes if values is not None else None, shape=(n,), dtype=np.int32,
                                      maxshape=(None,), chunks=(chunk,))
            ds.attrs["categories"] = json.dumps(names)
        elif c in _STR_COLUMNS:
            arr = None if values is None else np.array([str(v) for v in values], dtype=h5py.string_dtype())
            group.create_dataset(c, data=arr, shape=(n,), dtype=h5py.string_dtype(), maxshape=(None,), chunks=(chunk,))
        else:
            arr = None if values is None else np.asarray(values, dtype=column_dtype(c))
            group.create_dataset(c, data=arr, shape=(n,), dtype=column_dtype(c), maxshape=(None,), chunks=(chunk,))
    if columns == IMAGE_COLUMNS:
        keys = None if data is None else path_keys(data["path"])
        group.create_dataset("key", data=keys, shape=(n,), dtype=np.uint64, maxshape=(None,), chunks=(chunk,))
        group.attrs[TALLIES] = json.dumps(tally_values(data or {c: [] for c in IMAGE_COLUMNS}), sort_keys=True)


def absolute_count(paths: Sequence[Any]) -> int:
    """How many of ``paths`` are absolute (stored outside the collection root)."""
    return sum(1 for p in paths if os.path.isabs(p.decode() if isinstance(p, bytes) else str(p)))


def tally_values(images: dict[str, Sequence[Any]]) -> dict[str, Any]:
    """The tallies of image columns given as values: images per name of each categorical column
    ("" and None are none) and the number of absolute paths."""
    out: dict[str, Any] = {}
    for c in CATEGORICAL:
        names, counts = np.unique(np.array([str(v) for v in images[c] if v is not None and str(v)], dtype=str),
                                  return_counts=True)
        out[c] = {str(k): int(v) for k, v in zip(names, counts)}
    out["absolute_paths"] = absolute_count(images["path"])
    return out


def create_space(group: h5py.Group, name: str, attrs: dict[str, Any], n: int, dim: int, dtype: Any,
                 rows: np.ndarray | None = None, vectors: np.ndarray | None = None,
                 versions: np.ndarray | None = None, expected: int = 0) -> h5py.Group:
    """The datasets of one space (``n`` vectors of ``dim``), filled when arrays are given."""
    g = group.create_group(name)
    size = n or expected
    g.create_dataset("vectors", data=vectors, shape=(n, dim), dtype=dtype, maxshape=(None, dim),
                     chunks=(chunk_rows(size, vector_chunk(dim, dtype)), dim))
    ds = g.create_dataset("rows", data=None if rows is None else np.asarray(rows, np.int64), shape=(n,),
                          dtype=np.int64, maxshape=(None,), chunks=(chunk_rows(size, COLUMN_CHUNK),))
    ds.attrs[IDENTITY] = bool(n == 0 if rows is None else np.array_equal(np.asarray(rows), np.arange(n)))
    g.create_dataset("version", data=None if versions is None else np.asarray(versions, np.int64), shape=(n,),
                     dtype=np.int64, maxshape=(None,), chunks=(chunk_rows(size, COLUMN_CHUNK),))
    write_attrs(g.attrs, attrs)
    return g


def no_space_error(path: Path, e: OSError) -> Exception:
    """The one-line error for a failed write of a store file (disk full, not writable), or ``e``."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left to write {path}: free disk space and run again; finished work is kept")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"cannot write {path} ({e.strerror}): choose a writable --store location")
    return e


def write_file(
    path: Path,
    attrs: dict[str, Any],
    images: dict[str, Sequence],
    spaces: dict[str, SpaceData],
    failures: dict[str, Sequence],
    versions: dict[str, np.ndarray] | None = None,
) -> None:
    """Write a complete (small) store file atomically: temporary file, fsync, rename, fsync folder.

    The HDF5 image is built in memory and written with plain file I/O: HDF5 itself can crash
    when the disk fills up while it flushes, whereas a failed ``write`` is an ordinary error.
    ``versions``: per space, the journal sequence number of each vector (default: ``journal_seq``).
    """
    path = Path(path)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        write_attrs(f.attrs, {**attrs, "format": FORMAT})
        create_columns(f.create_group("images"), IMAGE_COLUMNS, len(images["path"]), images)
        create_columns(f.create_group("failures"), FAILURE_COLUMNS, len(failures["path"]), failures)
        sg = f.create_group("spaces")
        for name, (sattrs, rows, vectors) in spaces.items():
            seq = int(attrs.get("journal_seq", 0) or 0)
            ver = (versions or {}).get(name)
            ver = np.full(len(vectors), seq, np.int64) if ver is None else ver
            create_space(sg, name, sattrs, len(vectors), vectors.shape[1], vectors.dtype, rows, vectors, ver)
    try:
        atomic_write_bytes(path, buffer.getbuffer())
    except OSError as e:
        raise no_space_error(path, e) from e
