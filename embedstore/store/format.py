"""The on-disk layout of a store file: names, encoding of columns and attributes, one file read or written.

Layout of ``FILE.h5``::

    attrs                      format, root, journal_seq, created
    images/{path,label,split,size,hash,mtime}   one row per image, path relative to root
    spaces/<name>/vectors      (n, dim) float16 by default; chunked, resizable
    spaces/<name>/rows         (n,) row of each vector in the images table
    spaces/<name>.attrs        backbone, weights_sha256, preprocessing, pooling, dim, versions, created
    failures/{path,space,error,message,size,mtime}

Beside it: ``FILE.h5.journal/part-NNNNNNNNNN.h5`` (published batches, same layout) and
``FILE.h5.lock`` (the writer's lock).

Crash safety: :func:`write_file` builds the whole HDF5 image in memory and publishes it with
``_atomic.atomic_write_bytes`` (temporary file beside the target, fsync, ``os.replace``, fsync of the
folder), so a file is either absent, the old one, or the complete new one; a killed writer leaves
at most a ``.NAME.tmp-PID`` file, never read. Reading opens files read-only and refuses a damaged
file whole (``integrity.check_file``) with a ``StoreError`` naming it and the fix; a rows-only read
(for planning) runs every check but the vector scan, which every read with vectors still runs.
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
from .integrity import check_file

FORMAT = "embedstore/1"
IMAGE_COLUMNS = ("path", "label", "split", "size", "hash", "mtime")
FAILURE_COLUMNS = ("path", "space", "error", "message", "size", "mtime")
_STR_COLUMNS = {"path", "label", "split", "hash", "space", "error", "message"}
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


# --------------------------------------------------------------------------- reading one file


@dataclass
class _FileData:
    attrs: dict[str, Any]
    images: dict[str, np.ndarray]
    failures: dict[str, np.ndarray]
    spaces: dict[str, SpaceData]


def _decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
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


def column_dtype(column: str) -> type:
    """The in-memory type of an images/failures column: ``object`` (str), ``int64`` (size) or ``float64``."""
    return object if column in _STR_COLUMNS else (np.int64 if column == "size" else np.float64)


def _read_columns(group: h5py.Group, columns: Sequence[str]) -> dict[str, np.ndarray]:
    return {c: np.asarray(group[c].asstr()[()], dtype=object) if c in _STR_COLUMNS else group[c][()]
            for c in columns}


def _unreadable(path: Path, e: Exception) -> Exception:
    """The error for a store file that h5py cannot read: missing, or damaged (naming the fix)."""
    if not path.exists():
        return FileNotFoundError(str(path))
    return StoreError(
        f"{path} is not a readable embedstore file ({type(e).__name__}: {e}). "
        "Restore it from a backup, or move it aside and run `embedstore embed` again to rebuild it."
    )


def _read_file(path: Path, vectors: bool = True) -> _FileData:
    """One store file, checked whole (``integrity.check_file``).

    ``vectors=False``: a rows-only read for planning. The ``vectors`` datasets are not read (only
    their shape and type, from the HDF5 header), so every check but the NaN/Inf/zero scan still
    runs; each space's vectors come back as an empty ``(n, 0)`` array of the stored dtype.
    """
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = _decode_attrs(f.attrs)
            if attrs.get("format") != FORMAT:
                raise StoreError(f"{path} is not an embedstore file (format={attrs.get('format')!r}): it was "
                                 "written by another program; give --store another path, or move it aside")
            images = _read_columns(f["images"], IMAGE_COLUMNS)
            failures = _read_columns(f["failures"], FAILURE_COLUMNS)
            spaces = {}
            for name, g in f["spaces"].items():
                missing = [d for d in ("rows", "vectors") if not isinstance(g.get(d), h5py.Dataset)]
                if missing:
                    raise StoreError(f"{path}: spaces/{name} has no {' or '.join(missing)} dataset; the file is "
                                     "damaged: restore it from a backup, or move it aside and run `embedstore embed` again")
                spaces[name] = (_decode_attrs(g.attrs), g["rows"][()], g["vectors"][()] if vectors else g["vectors"])
            if not vectors:  # checked against the datasets' headers while the file is open
                check_file(path, attrs, images, failures, spaces, scan_vectors=False)
                spaces = {n: (a, r, np.empty((len(v), 0), v.dtype)) for n, (a, r, v) in spaces.items()}
        if vectors:
            check_file(path, attrs, images, failures, spaces)
    except (FileNotFoundError, StoreError):
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise _unreadable(path, e) from e
    return _FileData(attrs, images, failures, spaces)


def _read_attrs(path: Path) -> dict[str, Any]:
    """The file-level attributes of a store file, without reading its arrays."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return _decode_attrs(f.attrs)
    except (OSError, KeyError, ValueError) as e:
        raise _unreadable(path, e) from e


# --------------------------------------------------------------------------- writing one file


def _write_columns(group: h5py.Group, columns: Sequence[str], data: dict[str, Sequence]) -> None:
    for c in columns:
        values = data[c]
        if c in _STR_COLUMNS:
            arr = np.array([str(v) for v in values], dtype=h5py.string_dtype())
        else:
            arr = np.asarray(values, dtype=column_dtype(c))
        group.create_dataset(c, data=arr, maxshape=(None,), chunks=(_chunk_rows(len(arr), 4096),))


def _write_attrs(target: h5py.AttributeManager, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        if v is None:
            continue
        target[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v


def _chunk_rows(n: int, cap: int) -> int:
    """Chunk length: the whole dataset when small (journal parts stay small), else ``cap``."""
    return max(1, min(n, cap))


def write_file(
    path: Path,
    attrs: dict[str, Any],
    images: dict[str, Sequence],
    spaces: dict[str, SpaceData],
    failures: dict[str, Sequence],
) -> None:
    """Write a complete store file atomically: temporary file, fsync, rename, fsync folder.

    The HDF5 image is built in memory and written with plain file I/O: HDF5 itself can crash
    when the disk fills up while it flushes, whereas a failed ``write`` is an ordinary error.
    """
    path = Path(path)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _write_attrs(f.attrs, {**attrs, "format": FORMAT})
        _write_columns(f.create_group("images"), IMAGE_COLUMNS, images)
        _write_columns(f.create_group("failures"), FAILURE_COLUMNS, failures)
        sg = f.create_group("spaces")
        for name, (sattrs, rows, vectors) in spaces.items():
            g = sg.create_group(name)
            dim = vectors.shape[1]
            cap = max(1, (1 << 20) // max(1, dim * vectors.dtype.itemsize))  # ~1 MB chunks
            g.create_dataset("vectors", data=vectors, maxshape=(None, dim), chunks=(_chunk_rows(len(vectors), cap), dim))
            g.create_dataset("rows", data=np.asarray(rows, np.int64), maxshape=(None,),
                             chunks=(_chunk_rows(len(rows), 4096),))
            _write_attrs(g.attrs, sattrs)
    try:
        atomic_write_bytes(path, buffer.getbuffer())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"no space left to write {path}: free disk space and run again; finished work is kept") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StoreError(f"cannot write {path} ({e.strerror}): choose a writable --store location") from e
        raise
