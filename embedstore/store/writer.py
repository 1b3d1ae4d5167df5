"""Writing a store: the one ``StoreWriter`` (lock, journal parts, adoption of shard files, folding in).

Crash safety: one writer at a time holds ``FILE.h5.lock`` (a kernel lock, released by the kernel
if the writer dies, so a lock left by a killed writer never blocks the next one). Work in progress
goes to ``FILE.h5.journal/``: each committed batch is a complete file published by an atomic
rename, durable once ``commit`` returns. The main file is only ever replaced whole: ``consolidate``
applies the parts to a copy of it (``fold``) and renames the copy over it, and only then drops the
parts, so a kill at any point leaves whole parts, which the next writer folds in on ``acquire``.

Why not update the main file in place (or SWMR): readers keep it open while a writer works, and
in-place HDF5 updates are neither atomic nor safe for an open reader; a SWMR writer killed mid-run
leaves its file flagged as open, unreadable until ``h5clear`` is run. A renamed copy is all three.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import fsync_dir, temporary_beside
from ..errors import StoreError, StoreLockedError
from .fold import fold
from .format import FAILURE_COLUMNS, IMAGE_COLUMNS, READABLE, journal_dir, list_parts, lock_path, part_path, read_attrs, write_file
from .integrity import BAD_VECTOR, check_space_compatible, journal_seq, validate_space_name, vector_problems
from .mainfile import StoreFile
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
        self._uuid: str | None = None  # the identity given to a store that has none yet
        self._lineage: dict[str, dict[str, Any]] | None = None  # space -> attrs, checked before each commit

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
        self._lineage = None
        if self._lock_fh is not None:
            self._lock_fh.release()
            self._lock_fh = None

    def _base_seq(self) -> int:
        if not self.path.exists():
            return 0
        return journal_seq(self.path, read_attrs(self.path))

    def snapshot(self) -> Store | None:
        """The current content (main file plus journal), or None for a new store (vectors read on demand)."""
        try:
            return open_store(self.path)
        except FileNotFoundError:
            return None

    def commit(self, batch: Batch, space: str, space_attrs: dict[str, Any]) -> None:
        """Publish one batch as a journal part (atomic rename); it is durable once this returns."""
        validate_space_name(space)
        if not len(batch):
            return
        dim = int(space_attrs["dim"])
        vectors = np.stack(batch.vectors) if batch.vectors else np.empty((0, dim), np.float32)
        self._publish(batch.images, vectors, batch.failures, space, space_attrs)

    def commit_arrays(self, space: str, space_attrs: dict[str, Any], vectors: np.ndarray, paths: Any, *,
                      labels: Any = None, splits: Any = None, sizes: Any = None, hashes: Any = None,
                      mtimes: Any = None) -> None:
        """Publish vectors given as arrays (one per path) as one journal part, like ``commit``.

        A column left as None keeps what the store holds for an image it has (the part records the
        columns it leaves, and folding honours that); new images get none, or 0 for sizes and
        mtimes: vectors that came from elsewhere than ``embed`` need no image file. Another
        lineage in an existing space is refused.
        """
        validate_space_name(space)
        n = len(paths)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != n:
            raise StoreError(f"got {len(vectors)} vector(s) of shape {vectors.shape[1:]} for {n} path(s): "
                             "give one 1-D vector per path")
        if not n:
            return

        paths = [str(p) for p in paths]
        given = {"label": labels, "split": splits, "size": sizes, "hash": hashes, "mtime": mtimes}
        fills = {"label": "", "split": "", "size": 0, "hash": "", "mtime": 0.0}
        images: dict[str, list] = {"path": paths}
        for c, values in given.items():
            if values is None:  # kept as stored for images the store has (the part says so)
                images[c] = [fills[c]] * n
                continue
            values = list(values)
            if len(values) != n:
                raise StoreError(f"got {len(values)} values of column {c!r} for {n} path(s): give one per path")
            images[c] = [fills[c] if v is None else v for v in values]
        keep = [c for c, v in given.items() if v is None]
        self._publish(images, vectors, {c: [] for c in FAILURE_COLUMNS}, space, space_attrs, keep)

    def _check_lineage(self, space: str, space_attrs: dict[str, Any]) -> None:
        known = self._lineage
        if known is None:  # the store's spaces as this writer found them (a header read), then its own
            known = self._lineage = {}
            base = self.snapshot()
            if base is not None:
                with base:
                    known.update({n: sp.attrs for n, sp in base.spaces.items()})
        if space in known:
            check_space_compatible(known[space], space_attrs, space)
        else:
            known[space] = space_attrs

    def _publish(self, images: dict[str, Any], vectors: np.ndarray, failures: dict[str, Any], space: str,
                 space_attrs: dict[str, Any], keep_columns: list[str] | None = None) -> None:
        """Cast, refuse unusable vectors (recorded as failures), and write one journal part."""
        self._check_lineage(space, space_attrs)
        try:
            dtype = np.dtype(space_attrs.get("dtype", "float16"))
        except TypeError as e:
            raise StoreError(f"space {space!r} of {self.path} has dtype {space_attrs.get('dtype')!r}, not a vector "
                             "type: use float16 or float32, or choose another space name with --space NAME") from e
        with np.errstate(over="ignore"):  # a float16 overflow becomes Inf, refused just below
            vectors = vectors.astype(dtype, copy=False)
        bad = vector_problems(vectors)  # after the cast: float16 overflows to Inf
        if bad:  # such images are recorded as failures, never stored
            keep = np.setdiff1d(np.arange(len(vectors)), np.fromiter(bad, np.int64, len(bad)))
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
            attrs={**self._file_attrs(), "keep_columns": keep_columns or None},
            images=images,
            spaces={space: (space_attrs, np.arange(len(vectors)), vectors)},
            failures=failures,
            versions={space: np.full(len(vectors), self._seq, np.int64)},
        )

    def adopt(self, source: str | os.PathLike) -> None:
        """Publish a complete store file (e.g. a finished shard) as the next journal part.

        The file is hard-linked (copied across file systems) under a temporary name and renamed
        into the journal, so it is applied like any committed batch: later rows win.
        """
        source = Path(source)
        if read_attrs(source).get("format") not in READABLE:  # a missing or non-HDF5 file: a clear error too
            raise StoreError(f"{source} is not an embedstore file: only shard or store files can be merged")
        shard = StoreFile(source)  # a missing, foreign or damaged header: a clear error
        try:
            for name, sp in shard.spaces.items():  # a damaged file is refused before it becomes a part
                validate_space_name(name)
                shard.space_rows(sp)
                for a in range(0, len(sp), 65536):
                    shard.vectors(sp, np.arange(a, min(len(sp), a + 65536)))
        finally:
            shard.close()
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

    def _store_id(self, current: dict[str, Any]) -> str:
        """The store's uuid: the one it has (``current``: main file or first part attributes), else one made now."""
        if not current.get("uuid"):  # a new store, or one written before stores had an identity
            self._uuid = self._uuid or uuid.uuid4().hex
            return self._uuid
        return str(current["uuid"])

    def _file_attrs(self) -> dict[str, Any]:
        current = read_attrs(self.path) if self.path.exists() else {}
        return {"root": str(current.get("root", self.root) or ""), "uuid": self._store_id(current),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def consolidate(self) -> None:
        """Fold published journal parts into the main file (atomic replace), then drop them."""
        parts = list_parts(self.path)
        if not parts:
            return
        base_seq = self._base_seq()
        fresh = [(s, p) for s, p in parts if s > base_seq]
        if fresh:
            current = read_attrs(self.path) if self.path.exists() else {}
            if not current.get("uuid"):  # parts of a store without an identity carry the one they were given
                current = {**read_attrs(fresh[0][1]), **{k: v for k, v in current.items() if v}}
            attrs = {
                "root": str(current.get("root") or self.root or ""),
                "uuid": self._store_id(current),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "journal_seq": max(s for s, _ in fresh),
            }
            fold(self.path, fresh, attrs)
        for _, p in parts:
            p.unlink(missing_ok=True)
        try:
            journal_dir(self.path).rmdir()
        except OSError:
            pass
