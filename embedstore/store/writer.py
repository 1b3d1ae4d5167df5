"""Writing a store: the one ``StoreWriter`` (lock, journal parts, adoption of shard files, consolidation).

Crash safety: one writer at a time holds ``FILE.h5.lock`` (a kernel lock, released by the kernel
if the writer dies, so a lock left by a killed writer never blocks the next one). Work in progress
goes to ``FILE.h5.journal/``: each committed batch is a complete file published by an atomic
rename, durable once ``commit`` returns. The main file is only ever replaced whole: ``consolidate``
writes the merged content with ``format.write_file`` (atomic replace) and only then drops the
parts, so a kill at any point leaves whole parts, which the next writer folds in on ``acquire``.

Why not SWMR: a SWMR writer killed mid-run leaves its file flagged as open, unreadable until
``h5clear`` is run, and in-place HDF5 updates are not atomic; whole-file replacement is.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import fsync_dir, temporary_beside
from ..errors import StoreError, StoreLockedError
from .format import (
    FAILURE_COLUMNS,
    FORMAT,
    IMAGE_COLUMNS,
    _read_attrs,
    _read_file,
    journal_dir,
    list_parts,
    lock_path,
    part_path,
    write_file,
)
from .integrity import BAD_VECTOR, journal_seq, validate_space_name, vector_problems
from .locks import try_lock
from .reader import Store, open_store


@dataclass
class Batch:
    """What one committed batch adds: image rows, vectors of one space, failures."""

    images: dict[str, list] = field(default_factory=lambda: {c: [] for c in IMAGE_COLUMNS})
    vectors: list[np.ndarray] = field(default_factory=list)
    failures: dict[str, list] = field(default_factory=lambda: {c: [] for c in FAILURE_COLUMNS})

    def add_image(self, vector: np.ndarray, **row: Any) -> None:
        for c in IMAGE_COLUMNS:
            self.images[c].append(row[c])
        self.vectors.append(vector)

    def add_failure(self, **rec: Any) -> None:
        for c in FAILURE_COLUMNS:
            self.failures[c].append(rec[c])

    def __len__(self) -> int:
        return len(self.images["path"]) + len(self.failures["path"])


class StoreWriter:
    """The single writer of a store: holds the lock, publishes journal parts, folds them in.

    Use as a context manager. Opening recovers what a killed run left behind.
    """

    def __init__(self, path: str | os.PathLike, root: str | None = None) -> None:
        self.path = Path(path)
        self.root = root
        self._lock_fh = None
        self._seq = 0

    def __enter__(self) -> "StoreWriter":
        self.acquire()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.consolidate()
        finally:
            self.release()

    def acquire(self) -> None:
        folder = self.path.parent
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise StoreError(f"cannot write in {folder}: choose a writable location for --store")
        try:
            held = try_lock(lock_path(self.path))
        except OSError as e:
            raise StoreError(f"cannot lock {lock_path(self.path)} ({e}): put --store on a local file system") from e
        if isinstance(held, str):
            raise StoreLockedError(
                f"{self.path} is being written by {held}; wait for it to finish (readers may open it meanwhile)"
            )
        self._lock_fh = held
        try:
            self._remove_stale_temporaries()
            self.consolidate()  # fold in whatever a killed run left
            parts = list_parts(self.path)
            self._seq = max([self._base_seq()] + [s for s, _ in parts])
        except BaseException:
            self.release()  # __exit__ does not run when __enter__ fails
            raise

    def _remove_stale_temporaries(self) -> None:
        """Half-written files of a killed writer (never visible to readers) are deleted."""
        pattern = f".{self.path.name}.tmp-*"
        stale = list(self.path.parent.glob(pattern))
        if journal_dir(self.path).is_dir():
            stale += list(journal_dir(self.path).glob(".part-*.tmp-*"))
        for tmp in stale:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.release()
            self._lock_fh = None

    def _base_seq(self) -> int:
        if not self.path.exists():
            return 0
        return journal_seq(self.path, _read_attrs(self.path))

    def snapshot(self, *, vectors: bool = True) -> Store | None:
        """The current content (main file plus journal), or None for a new store.

        ``vectors=False``: the rows-only view that planning needs (see ``open_store``).
        """
        try:
            return open_store(self.path, vectors=vectors)
        except FileNotFoundError:
            return None

    def commit(self, batch: Batch, space: str, space_attrs: dict[str, Any]) -> None:
        """Publish one batch as a journal part (atomic rename); it is durable once this returns."""
        validate_space_name(space)
        if not len(batch):
            return
        dim = int(space_attrs["dim"])
        try:
            dtype = np.dtype(space_attrs.get("dtype", "float16"))
        except TypeError as e:
            raise StoreError(f"space {space!r} of {self.path} has dtype {space_attrs.get('dtype')!r}, not a vector "
                             "type: use float16 or float32, or choose another space name with --space NAME") from e
        with np.errstate(over="ignore"):  # a float16 overflow becomes Inf, refused just below
            vectors = np.stack(batch.vectors).astype(dtype) if batch.vectors else np.empty((0, dim), dtype)
        images, failures = batch.images, batch.failures
        bad = vector_problems(vectors)  # after the cast: float16 overflows to Inf
        if bad:  # such images are recorded as failures, never stored
            keep = [i for i in range(len(vectors)) if i not in bad]
            failures = {c: list(v) for c, v in failures.items()}
            for i, why in bad.items():
                rec = {"path": images["path"][i], "space": space, "error": BAD_VECTOR,
                       "message": f"{why}: the backbone gave no usable vector for this image",
                       "size": images["size"][i], "mtime": images["mtime"][i]}
                for c in FAILURE_COLUMNS:
                    failures[c].append(rec[c])
            images = {c: [v[i] for i in keep] for c, v in images.items()}
            vectors = vectors[keep]
        jdir = journal_dir(self.path)
        jdir.mkdir(exist_ok=True)
        self._seq += 1
        write_file(
            part_path(self.path, self._seq),
            attrs=self._file_attrs(),
            images=images,
            spaces={space: (space_attrs, np.arange(len(vectors)), vectors)},
            failures=failures,
        )

    def adopt(self, source: str | os.PathLike) -> None:
        """Publish a complete store file (e.g. a finished shard) as the next journal part.

        The file is hard-linked (copied across file systems) under a temporary name and renamed
        into the journal, so it is applied like any committed batch: later rows win.
        """
        source = Path(source)
        if _read_attrs(source).get("format") != FORMAT:  # a missing or non-HDF5 file: a clear error too
            raise StoreError(f"{source} is not an embedstore file: only shard or store files can be merged")
        data = _read_file(source)  # a damaged file is refused before it becomes a part of this store
        for name in data.spaces:
            validate_space_name(name)
        jdir = journal_dir(self.path)
        jdir.mkdir(exist_ok=True)
        self._seq += 1
        dest = part_path(self.path, self._seq)
        tmp = temporary_beside(dest)
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(jdir)

    def _file_attrs(self) -> dict[str, Any]:
        root = self.root
        if self.path.exists():
            root = str(_read_attrs(self.path).get("root", root))
        return {"root": root or "", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def consolidate(self) -> None:
        """Fold published journal parts into the main file (atomic replace), then drop them."""
        parts = list_parts(self.path)
        if not parts:
            return
        base_seq = self._base_seq()
        fresh = [(s, p) for s, p in parts if s > base_seq]
        if fresh:
            store = open_store(self.path)
            attrs = {
                "root": store.root or self.root or "",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "journal_seq": max(s for s, _ in fresh),
            }
            write_file(
                self.path,
                attrs=attrs,
                images=store.images,
                spaces={n: (s.attrs, s.rows, s.vectors) for n, s in store.spaces.items()},
                failures={c: [f[c] for f in store.failures] for c in FAILURE_COLUMNS},
            )
        for _, p in parts:
            p.unlink(missing_ok=True)
        try:
            journal_dir(self.path).rmdir()
        except OSError:
            pass
