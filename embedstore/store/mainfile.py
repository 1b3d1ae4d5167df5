"""One store file opened for reading: its header checked at open, columns and vectors read on demand.

Opening reads attributes and dataset shapes only. ``column``/``codes``/``keys`` read the rows
asked for; vectors are read through ``read_rows`` in bounded slabs. What a read touches is
checked as it is read (row ids in range and distinct, vectors finite and non-zero), so a damaged
file is refused with a ``StoreError`` naming it and the fix as soon as a command uses the damage.
Journal parts are small: ``read_all`` loads one whole and runs every check (``integrity.check_file``).

Crash safety: read-only. Files are opened without HDF5 locking; writers only ever publish whole
files by atomic rename, so an open file never changes under its reader.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from .format import (CATEGORICAL, COLUMN_CHUNK, FAILURE_COLUMNS, IMAGE_COLUMNS, READABLE, _STR_COLUMNS, column_dtype,
                     decode_attrs, decode_categories, encode_categories, unreadable)
from .integrity import FIX, check_file, check_rows, journal_seq, vector_problems
from .keys import path_keys

SLAB = 32768  # most rows read by one HDF5 call
GAP = 1024  # rows closer than this are read in one slab


def read_rows(ds: Any, idx: np.ndarray) -> np.ndarray:
    """``ds[idx]`` for any int positions (any order, repeats allowed), read in bounded slabs."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    shape = (len(idx),) + tuple(ds.shape[1:])
    if not len(idx):
        return np.empty(shape, ds.dtype)
    if idx[0] >= 0 and idx[-1] - idx[0] == len(idx) - 1 and idx[-1] < len(ds) and (np.diff(idx) == 1).all():
        return ds[int(idx[0]):int(idx[-1]) + 1]  # a run of consecutive rows (a slice): one read, no copies
    uniq, inverse = np.unique(idx, return_inverse=True)
    if uniq[0] < 0 or uniq[-1] >= len(ds):
        raise IndexError(f"positions {int(uniq[0])}..{int(uniq[-1])} outside 0..{len(ds) - 1}")
    out = np.empty((len(uniq),) + tuple(ds.shape[1:]), ds.dtype)
    breaks = np.flatnonzero(np.diff(uniq) > GAP) + 1
    for group in np.split(np.arange(len(uniq)), breaks):
        for part in np.array_split(group, max(1, -(-(int(uniq[group[-1]] - uniq[group[0]]) + 1) // SLAB))):
            if not len(part):
                continue
            lo, hi = int(uniq[part[0]]), int(uniq[part[-1]]) + 1
            block = ds[lo:hi]
            out[part] = block[uniq[part] - lo]
    return out[inverse]


def _close(f: h5py.File, fh: Any) -> None:
    try:
        f.close()
    except Exception:  # noqa: BLE001 - closing a file h5py already closed
        pass
    fh.close()


@dataclass
class SpaceFile:
    """The datasets of one space in one file (vectors read on demand)."""

    name: str
    attrs: dict[str, Any]
    rows: Any  # h5py.Dataset (n,)
    vectors: Any  # h5py.Dataset (n, dim)
    version: Any  # h5py.Dataset (n,) or None (format 1)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


class StoreFile:
    """A store file (main file or journal part) open read-only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # through a Python file object: HDF5's registry of open files (and its locking flags) is not
        # shared with anything else that opens the path, so a kept-open snapshot never blocks them
        self._fh = open(self.path, "rb")
        try:
            self.f = h5py.File(self._fh, "r")
        except (OSError, ValueError) as e:
            self._fh.close()
            raise unreadable(self.path, e) from e
        self._finalizer = weakref.finalize(self, _close, self.f, self._fh)  # closed when dropped
        self._keys: np.ndarray | None = None
        self._codes: dict[str, tuple[np.ndarray, list[str]]] = {}
        try:
            self._open()
        except BaseException as e:
            self.close()
            if isinstance(e, (OSError, KeyError, ValueError, TypeError)) and not isinstance(e, FileNotFoundError):
                raise unreadable(self.path, e) from e
            raise

    def _damaged(self, what: str) -> StoreError:
        return StoreError(f"{self.path}: {what}; {FIX}")

    def _open(self) -> None:
        f = self.f
        self.attrs = decode_attrs(f.attrs)
        self.format = self.attrs.get("format")
        if self.format not in READABLE:
            raise StoreError(f"{self.path} is not an embedstore file (format={self.format!r}): it was written by "
                             "another program; give --store another path, or move it aside")
        self.journal_seq = journal_seq(self.path, self.attrs)
        for group, cols in (("images", IMAGE_COLUMNS), ("failures", FAILURE_COLUMNS)):
            g = f.get(group)
            if not isinstance(g, h5py.Group) or any(not isinstance(g.get(c), h5py.Dataset) for c in cols):
                missing = [c for c in cols if not isinstance(g, h5py.Group) or not isinstance(g.get(c), h5py.Dataset)]
                raise self._damaged(f"{group} has no {', '.join(missing)} dataset")
            shapes = {c: g[c].shape for c in cols}
            for c, shape in shapes.items():
                if len(shape) != 1:
                    raise self._damaged(f"{group}/{c} has shape {shape}, not one value per row")
            if len({s[0] for s in shapes.values()}) > 1:
                shown = ", ".join(f"{group}/{c} has {s[0]}" for c, s in shapes.items())
                raise self._damaged(f"the {group} columns have different lengths ({shown})")
        self.images = f["images"]
        self.n_images = int(self.images["path"].shape[0])
        if "key" in self.images and self.images["key"].shape != (self.n_images,):
            raise self._damaged(f"images/key has shape {self.images['key'].shape}, not ({self.n_images},)")
        self.spaces: dict[str, SpaceFile] = {}
        for name, g in f["spaces"].items():
            missing = [d for d in ("rows", "vectors") if not isinstance(g.get(d), h5py.Dataset)]
            if missing:
                raise self._damaged(f"spaces/{name} has no {' or '.join(missing)} dataset")
            sp = SpaceFile(name, decode_attrs(g.attrs), g["rows"], g["vectors"], g.get("version"))
            self._check_space(sp)
            self.spaces[name] = sp

    def _check_space(self, sp: SpaceFile) -> None:
        where, v = f"spaces/{sp.name}", sp.vectors
        if v.ndim != 2 or v.dtype.kind != "f":
            raise self._damaged(f"{where}/vectors is {v.dtype} of shape {v.shape}, not a 2-D float array")
        if sp.rows.ndim != 1 or sp.rows.dtype.kind not in "iu":
            raise self._damaged(f"{where}/rows is {sp.rows.dtype} of shape {sp.rows.shape}, not a 1-D integer array")
        if len(sp.rows) != len(v):
            raise self._damaged(f"{where}/rows has {len(sp.rows)} entries but {where}/vectors has {len(v)} rows")
        if sp.version is not None and sp.version.shape != (len(v),):
            raise self._damaged(f"{where}/version has shape {sp.version.shape}, not ({len(v)},)")
        dim = sp.attrs.get("dim")
        if dim is not None and dim != v.shape[1]:
            raise self._damaged(f"{where} has attribute dim={dim!r} but its vectors have {v.shape[1]} columns")

    def close(self) -> None:
        self._finalizer()

    # ----------------------------------------------------------------------- images columns

    def categories(self, name: str) -> list[str]:
        return self.codes(name, np.empty(0, np.int64))[1]

    def codes(self, name: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
        """int32 codes (-1 = none) and names of a categorical column, at ``rows`` (all when None)."""
        ds = self.images[name]
        if ds.dtype.kind in "iu":  # format 2
            names = json.loads(ds.attrs.get("categories", "[]"))
            codes = ds[()] if rows is None else read_rows(ds, rows)
            return codes.astype(np.int32, copy=False), names
        if name not in self._codes:  # format 1: strings, encoded once
            self._codes[name] = encode_categories(ds.asstr()[()])
        codes, names = self._codes[name]
        return (codes if rows is None else codes[np.asarray(rows, np.int64)]), names

    def column(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """An images column decoded (strings as an object array), at ``rows`` (all when None)."""
        if name in CATEGORICAL:
            return decode_categories(*self.codes(name, rows))
        ds = self.images[name]
        if name in _STR_COLUMNS:
            if rows is None:
                return np.asarray(ds.asstr()[()], dtype=object)
            raw = read_rows(ds, rows)
            out = np.empty(len(raw), dtype=object)
            out[:] = [x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else x for x in raw]
            return out
        return np.asarray(ds[()] if rows is None else read_rows(ds, rows), dtype=column_dtype(name))

    def keys(self) -> np.ndarray:
        """``images/key`` of every row (computed from the paths for a format 1 file)."""
        if self._keys is None:
            self._keys = self.images["key"][()] if "key" in self.images else path_keys(self.column("path"))
        return self._keys

    def find(self, column: str, values: np.ndarray) -> np.ndarray:
        """The first row of each of a few ``values`` in ``images/<column>`` (-1: none), scanned a chunk
        at a time: memory stays one chunk whatever the store's size (``keys`` holds the whole column)."""
        ds = self.images[column]
        found = np.full(len(values), -1, np.int64)
        for a in range(0, self.n_images, COLUMN_CHUNK):
            block = ds[a:a + COLUMN_CHUNK] if column != "path" else ds.asstr()[a:a + COLUMN_CHUNK]
            for j in np.flatnonzero(found < 0).tolist():
                hit = np.flatnonzero(block == values[j])
                if len(hit):
                    found[j] = a + int(hit[0])
            if (found >= 0).all():
                break
        return found

    def failures(self) -> dict[str, np.ndarray]:
        g = self.f["failures"]
        return {c: (np.asarray(g[c].asstr()[()], dtype=object) if c in _STR_COLUMNS else g[c][()])
                for c in FAILURE_COLUMNS}

    # ----------------------------------------------------------------------- checked reads

    def space_rows(self, sp: SpaceFile) -> np.ndarray:
        """The whole rows dataset of a space, checked (in range, distinct)."""
        rows = sp.rows[()].astype(np.int64, copy=False)
        if len(rows) and not (np.all(rows[1:] > rows[:-1]) and rows[0] >= 0 and rows[-1] < self.n_images):
            check_rows(self.path, f"spaces/{sp.name}", rows, self.n_images)
        return rows

    def space_versions(self, sp: SpaceFile) -> np.ndarray:
        if sp.version is None:
            return np.full(len(sp), self.journal_seq, np.int64)
        return sp.version[()].astype(np.int64, copy=False)

    def vectors(self, sp: SpaceFile, positions: np.ndarray) -> np.ndarray:
        """Vectors at ``positions``, refused whole when one of them is NaN/Inf or all zeros."""
        block = read_rows(sp.vectors, positions)
        bad = vector_problems(block)
        if bad:
            first = int(np.asarray(positions).reshape(-1)[min(bad)])
            raise self._damaged(f"spaces/{sp.name}/vectors has {len(bad)} vector(s) with NaN/Inf values or all zeros "
                                f"(e.g. row {int(sp.rows[first])})")
        return block

    def read_all(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, tuple]]:
        """The whole file (a journal part), every check run: (images, failures, spaces).

        ``spaces``: name -> (attrs, rows, vectors, versions).
        """
        images = {c: self.column(c) for c in IMAGE_COLUMNS}
        failures = self.failures()
        spaces = {n: (sp.attrs, sp.rows[()], sp.vectors[()], self.space_versions(sp)) for n, sp in self.spaces.items()}
        check_file(self.path, self.attrs, images, failures, {n: s[:3] for n, s in spaces.items()})
        return images, failures, spaces
