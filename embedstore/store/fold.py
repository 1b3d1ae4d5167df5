"""Folding journal parts into the main file: the new content is appended to a copy, published by rename.

The main file is copied beside itself (a reflink where the file system has them, else an
in-kernel ``copy_file_range``, with no Python or HDF5 work per row), then each part is applied
to the copy in place, streamed chunk by chunk: new images and vectors extend the resizable
datasets, re-embedded rows are overwritten where they are, and vectors of images whose content
changed are removed (the last vector moves into the hole, so positions stay dense). HDF5 work
and memory follow the rows the parts hold, plus 16 bytes per image for the path-key lookup.
A format 1 main file (or none) is rewritten whole once, through the same code, into format 2.

Crash safety: the copy (in memory for a small store) is a temporary file (``.NAME.tmp-PID``) that no reader ever opens; it is
fsync'd and renamed over the main file, the folder fsync'd, and only then are the parts deleted.
A kill at any point leaves the old main file and every part, which the next writer folds again.
Readers with the old main file open keep reading it (the rename does not change an open file).
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._atomic import atomic_write_bytes, fsync_dir, temporary_beside
from ..errors import StoreError
from .format import (CATEGORICAL, COLUMN_CHUNK, FAILURE_COLUMNS, FORMAT, IDENTITY, IMAGE_COLUMNS, _STR_COLUMNS,
                     column_dtype, create_columns, create_space, decode_attrs, encode_categories, no_space_error, write_attrs)
from .integrity import check_space_compatible, merge_runtimes
from .keys import KeyIndex, path_keys
from .mainfile import StoreFile, read_rows
from . import tallies

FICLONE = 0x40049409  # linux/fs.h: share the extents of a file (btrfs, XFS, bcachefs)


def _copy(src: Path, dst: Path) -> None:
    """Copy a file: a reflink when the file system can, else the kernel's own copy."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def _indexed(ds: h5py.Dataset, block: int = 1 << 22) -> KeyIndex:
    """value -> position over a 1-D dataset (path keys, or a space's rows), read in blocks."""
    index = KeyIndex()
    for a in range(0, len(ds), block):
        values = ds[a:a + block]
        index.add(values.astype(np.uint64, copy=False), np.arange(a, a + len(values)))
    return index


class _Target:
    """The writable copy being folded into: its images table, key lookup and spaces."""

    def __init__(self, f: h5py.File) -> None:
        self.f = f
        self.images = f["images"]
        self.n = int(self.images["path"].shape[0])
        self.index = _indexed(self.images["key"])
        self.names = {c: json.loads(self.images[c].attrs.get("categories", "[]")) for c in CATEGORICAL}
        self._positions: dict[str, KeyIndex] = {}
        # what `info` shows, kept up to date for the rows written (counted once for an older file)
        self.tallies = tallies.read(self.images) or (tallies.scan(self.images) if self.n else tallies.empty())

    def positions(self, name: str) -> KeyIndex:
        """image row -> position in space ``name`` (built once per fold, kept up to date)."""
        if name not in self._positions:
            self._positions[name] = _indexed(self.f["spaces"][name]["rows"])
        return self._positions[name]

    def rows_for(self, paths: list[str]) -> np.ndarray:
        """Rows of ``paths`` in the target (-1 = new), confirmed against the stored paths."""
        rows = self.index.lookup(path_keys(paths))
        hit = np.flatnonzero(rows >= 0)
        if len(hit):
            order = hit[np.argsort(rows[hit])]
            stored = _strings(self.images["path"], rows[order])
            for j, p in zip(order.tolist(), stored):
                if p != paths[j]:  # a key collision: look the path up the slow way
                    rows[j] = self._scan(paths[j])
        return rows

    def _scan(self, path: str) -> int:
        for a in range(0, self.n, COLUMN_CHUNK):
            hits = np.flatnonzero(self.images["path"].asstr()[a:a + COLUMN_CHUNK] == np.array(path, dtype=object))
            if len(hits):
                return a + int(hits[0])
        return -1

    def write_images(self, rows: np.ndarray, data: dict[str, np.ndarray], keep: set[str] = frozenset()) -> None:
        """Write image columns at ``rows`` (existing rows overwritten, rows >= n appended).

        Columns in ``keep`` are written for new rows only: existing rows keep their values.
        """
        before = self.n
        end = int(rows.max()) + 1 if len(rows) else self.n
        if end > self.n:
            for c in list(IMAGE_COLUMNS) + ["key"]:
                self.images[c].resize((end,))
            self.n = end
        order = np.argsort(rows)
        idx = rows[order]
        new = idx >= before
        for c in IMAGE_COLUMNS:
            sel = new if c in keep else np.ones(len(idx), bool)
            values = data[c][order][sel]
            if c in CATEGORICAL:
                old = idx[sel & ~new]  # rows overwritten: their old names leave the tallies
                removed = tallies.count_names(read_rows(self.images[c], old), self.names[c]) if len(old) else {}
                values, self.names[c] = encode_categories(values.tolist(), self.names[c])
                self.images[c].attrs["categories"] = json.dumps(self.names[c])
                tallies.update(self.tallies, c, removed, tallies.count_names(values, self.names[c]))
            elif c in _STR_COLUMNS:
                values = np.array([str(v) for v in values], dtype=h5py.string_dtype())
            else:
                values = values.astype(column_dtype(c))
            _write_at(self.images[c], idx[sel], values)
        _write_at(self.images["key"], idx[new], path_keys(data["path"][order][new]))
        self.tallies[tallies.ABSOLUTE] += tallies.absolute_count(data["path"][order][new])  # a row's path never changes
        tallies.write(self.images, self.tallies)


def _strings(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """A string column at ``rows`` (any order, repeats allowed) as an object array."""
    raw = read_rows(ds, rows)
    out = np.empty(len(raw), dtype=object)
    out[:] = [x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else x for x in raw]
    return out


def _write_at(ds: h5py.Dataset, idx: np.ndarray, values: np.ndarray) -> None:
    """``ds[idx] = values`` for sorted distinct ``idx``: contiguous runs as slices."""
    if not len(idx):
        return
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    for run in np.split(np.arange(len(idx)), breaks):
        lo = int(idx[run[0]])
        ds[lo:lo + len(run)] = values[run[0]:run[-1] + 1]


def _identity(ds: h5py.Dataset) -> bool:
    """Whether a space's rows dataset holds row p at every position p (its attribute; counted once,
    a chunk at a time, for a file written before the attribute existed)."""
    if IDENTITY not in ds.attrs:
        ds.attrs[IDENTITY] = all(np.array_equal(ds[a:a + COLUMN_CHUNK], np.arange(a, min(len(ds), a + COLUMN_CHUNK)))
                                 for a in range(0, len(ds), COLUMN_CHUNK))
    return bool(ds.attrs[IDENTITY])


def _remove_positions(g: h5py.Group, drop: np.ndarray, index: KeyIndex) -> None:
    """Remove vectors at positions ``drop`` (sorted, distinct): the last ones move into the holes."""
    m = int(g["vectors"].shape[0])
    keep_len = m - len(drop)
    holes = drop[drop < keep_len]
    movers = np.setdiff1d(np.arange(keep_len, m), drop)
    gone = g["rows"][drop.tolist()] if len(drop) else np.empty(0, np.int64)
    moved_rows = g["rows"][movers.tolist()] if len(movers) else np.empty(0, np.int64)
    index.discard(gone.astype(np.uint64))
    index.add(moved_rows.astype(np.uint64), holes)
    for name in ("vectors", "rows", "version"):
        ds = g[name]
        if len(holes):
            moved = ds[movers.min():m][movers - movers.min()]
            for i, h in enumerate(holes.tolist()):
                ds[h] = moved[i]
        ds.resize((keep_len,) + ds.shape[1:])


def apply_file(target: _Target, part: StoreFile, seq: int, chunk: int = COLUMN_CHUNK) -> None:
    """Apply one store file (a journal part, an adopted shard, or a format 1 main file) to the target."""
    f = target.f
    n = part.n_images
    mapping = np.empty(n, np.int64)
    changed: list[np.ndarray] = []
    keep = set(part.attrs.get("keep_columns") or ())  # columns the part leaves as stored
    for a in range(0, n, chunk):
        rows_local = np.arange(a, min(n, a + chunk))
        data = {c: part.column(c, rows_local) for c in IMAGE_COLUMNS}
        paths = data["path"].tolist()
        rows = target.rows_for(paths)
        known = np.flatnonzero(rows >= 0)
        if len(known) and "hash" not in keep:
            order = known[np.argsort(rows[known])]
            old = _strings(target.images["hash"], rows[order])
            changed.append(rows[order][old != data["hash"][order]])
        fresh: dict[str, int] = {}
        for j in np.flatnonzero(rows < 0).tolist():
            rows[j] = fresh.setdefault(paths[j], target.n + len(fresh))
        if fresh:
            target.index.add(path_keys(list(fresh)), np.fromiter(fresh.values(), np.int64, len(fresh)))
        uniq, last = np.unique(rows[::-1], return_index=True)  # a path twice in one chunk: the last wins
        pick = len(rows) - 1 - last
        target.write_images(uniq, {c: v[pick] for c, v in data.items()}, keep)
        mapping[rows_local] = rows
    changed_rows = np.unique(np.concatenate(changed)) if changed else np.empty(0, np.int64)
    spaces = f.require_group("spaces")
    written: dict[str, np.ndarray] = {}
    for name, sp in part.spaces.items():
        g = spaces.get(name)
        dim, dtype = int(sp.vectors.shape[1]), sp.vectors.dtype
        if g is None:
            g = create_space(spaces, name, sp.attrs, 0, dim, dtype, expected=len(sp))
        else:
            old = decode_attrs(g.attrs)
            check_space_compatible(old, sp.attrs, name)
            write_attrs(g.attrs, merge_runtimes(old, sp.attrs))  # another runtime's vectors join the space
        local = part.space_rows(sp)
        rows = mapping[local]
        index = target.positions(name)
        pos = index.lookup(rows.astype(np.uint64))
        m = int(g["vectors"].shape[0])
        new = np.flatnonzero(pos < 0)
        pos[new] = m + np.arange(len(new))
        identity = _identity(g["rows"]) and np.array_equal(pos[new], rows[new])  # overwrites keep pos == row
        total = m + len(new)
        for ds_name in ("vectors", "rows", "version"):
            g[ds_name].resize((total,) + g[ds_name].shape[1:])
        index.add(rows[new].astype(np.uint64), pos[new])
        for b in range(0, len(rows), chunk):
            s = slice(b, b + chunk)
            srt = np.argsort(pos[s])
            idx = pos[s][srt]
            block = part.vectors(sp, np.arange(b, min(len(rows), b + chunk)))
            _write_at(g["vectors"], idx, block[srt])
            _write_at(g["rows"], idx, rows[s][srt])
            _write_at(g["version"], idx, np.full(len(idx), seq, np.int64))
        g["rows"].attrs[IDENTITY] = identity
        g.attrs["generation"] = seq
        written[name] = rows
    if len(changed_rows):  # content changed: vectors from before the change are stale in every other space
        for name, g in spaces.items():
            stale = np.setdiff1d(changed_rows, written.get(name, np.empty(0, np.int64)))
            if not len(stale):
                continue
            drop = target.positions(name).lookup(stale.astype(np.uint64))
            drop = np.unique(drop[drop >= 0])
            if len(drop):
                g["rows"].attrs[IDENTITY] = _identity(g["rows"]) and int(drop[0]) == len(g["rows"]) - len(drop)
                _remove_positions(g, drop, target.positions(name))
                g.attrs["generation"] = seq
    _merge_failures(f, part, written, mapping)
    f.attrs["journal_seq"] = max(int(f.attrs.get("journal_seq", 0)), seq)


def _merge_failures(f: h5py.File, part: StoreFile, written: dict[str, np.ndarray], mapping: np.ndarray) -> None:
    """Failures of the target, updated by the part (later records win; a stored vector clears one)."""
    old = f["failures"]
    recs = {}
    cur = {c: (old[c].asstr()[()] if c in _STR_COLUMNS else old[c][()]) for c in FAILURE_COLUMNS}
    for j in range(len(cur["path"])):
        recs[(cur["path"][j], cur["space"][j])] = {c: cur[c][j] for c in FAILURE_COLUMNS}
    new = part.failures()
    for j in range(len(new["path"])):
        recs[(new["path"][j], new["space"][j])] = {c: new[c][j] for c in FAILURE_COLUMNS}
    if not recs:
        return
    for name, rows in written.items():
        if len(rows) and recs:
            paths = set(part.column("path", np.flatnonzero(np.isin(mapping, rows))).tolist())
            for key in [k for k in recs if k[1] == name and k[0] in paths]:
                del recs[key]
    del f["failures"]
    create_columns(f.create_group("failures"), FAILURE_COLUMNS, len(recs),
                   {c: [r[c] for r in recs.values()] for c in FAILURE_COLUMNS})


IN_MEMORY_MAX = 256 << 20  # folds of smaller stores are built in memory and written with plain I/O


def fold(path: Path, parts: list[tuple[int, Path]], attrs: dict[str, Any]) -> None:
    """Publish the main file at ``path`` with ``parts`` applied (in place on a copy, then renamed).

    A small store (under ``IN_MEMORY_MAX`` with its parts) is folded in memory and published with
    ``atomic_write_bytes``: a full disk is then an ordinary failed ``write``. A large one is folded
    in a temporary file beside it, after checking the disk has room (HDF5 fails messily when a
    disk fills under it).
    """
    tmp = temporary_beside(path)
    tmp.unlink(missing_ok=True)
    main = StoreFile(path) if path.exists() else None
    try:
        in_place = main is not None and main.format == FORMAT and "key" in main.images
        size = (path.stat().st_size if main is not None else 0) + sum(p.stat().st_size for _, p in parts)
        in_memory = size < IN_MEMORY_MAX
        if in_memory:
            target: Any = io.BytesIO(path.read_bytes() if in_place else b"")
        else:
            _check_room(path, parts, main)
            if in_place:
                main.close()
                _copy(path, tmp)
            target = tmp
        with h5py.File(target, "r+" if in_place else "w", locking=False) as f:
            _apply_all(f, main, in_place, parts, attrs)
        if in_memory:
            atomic_write_bytes(path, target.getbuffer())
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except OSError as e:
        raise no_space_error(path, e) from e
    finally:
        if main is not None:
            main.close()
        tmp.unlink(missing_ok=True)


def _rows_in(path: Path) -> int:
    part = StoreFile(path)
    try:
        return part.n_images
    finally:
        part.close()


def _apply_all(f: h5py.File, main: StoreFile | None, in_place: bool, parts: list[tuple[int, Path]],
               attrs: dict[str, Any]) -> None:
    if not in_place:
        expected = (main.n_images if main is not None else 0) + sum(_rows_in(p) for _, p in parts)
        write_attrs(f.attrs, {"format": FORMAT, "journal_seq": 0})
        create_columns(f.create_group("images"), IMAGE_COLUMNS, 0, expected=expected)
        create_columns(f.create_group("failures"), FAILURE_COLUMNS, 0)
        f.create_group("spaces")
    target = _Target(f)
    if main is not None and not in_place:
        apply_file(target, main, main.journal_seq)
        for name in main.spaces:  # keep the generation of a format 1 file
            f["spaces"][name].attrs["generation"] = main.journal_seq
    for seq, p in parts:
        part = StoreFile(p)
        try:
            apply_file(target, part, seq)
        finally:
            part.close()
    write_attrs(f.attrs, {**attrs, "format": FORMAT})


def _check_room(path: Path, parts: list[tuple[int, Path]], main: StoreFile | None) -> None:
    """Refuse to start a fold the disk cannot hold (HDF5 can crash when a disk fills mid-write).

    The fold writes one new file: the main file (copied, or rewritten from format 1) plus what the
    parts add, which takes no more room than the parts themselves (each part repeats its own
    headers); 5% and 1 MiB are left for HDF5's metadata. The parts are deleted only afterwards.
    """
    need = int(sum(p.stat().st_size for _, p in parts) * 1.05) + (path.stat().st_size if main is not None else 0) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise StoreError(f"no space left to write {path}: folding its journal needs about {need / 2**20:.1f} MiB and "
                         f"{path.parent} has {free / 2**20:.1f} MiB free; free disk space and run again; finished work is kept")
