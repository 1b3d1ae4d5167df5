"""The HDF5 store: one file per image collection, one embedding space per backbone.

Layout of ``FILE.h5``::

    attrs                      format, root, journal_seq, created
    images/{path,label,split,size,hash,mtime}   one row per image, path relative to root
    spaces/<name>/vectors      (n, dim) float16 by default; chunked, resizable
    spaces/<name>/rows         (n,) row of each vector in the images table
    spaces/<name>.attrs        backbone, weights_sha256, preprocessing, pooling, dim, versions, created
    failures/{path,space,error,message,size,mtime}

Writes are never half-visible. The main file is only ever replaced whole (``os.replace`` of a
fully written, fsynced temporary file). Work in progress goes to ``FILE.h5.journal/``: each
committed batch is a small file of the same layout, published by an atomic rename. Readers
see the main file plus the published parts, i.e. a consistent prefix of a running job; a
killed job leaves only whole parts, which the next writer folds into the main file.
One writer at a time holds ``FILE.h5.lock`` (a kernel lock taken with ``filelock``, released by the
kernel if the writer dies: a lock file left by a killed writer never blocks the next one).

Why not SWMR: a SWMR writer killed mid-run leaves its file flagged as open, unreadable until
``h5clear`` is run, and in-place HDF5 updates are not atomic; whole-file replacement is.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..errors import StoreError, StoreLockedError
from .integrity import BAD_VECTOR, check_file, journal_seq, validate_space_name, vector_problems
from .locks import try_lock

FORMAT = "embedstore/1"
IMAGE_COLUMNS = ("path", "label", "split", "size", "hash", "mtime")
FAILURE_COLUMNS = ("path", "space", "error", "message", "size", "mtime")
_STR_COLUMNS = {"path", "label", "split", "hash", "space", "error", "message"}
_PART_RE = re.compile(r"^part-(\d{10})\.h5$")


# --------------------------------------------------------------------------- reading


@dataclass
class Space:
    """One embedding space: vectors with the image rows they belong to."""

    name: str
    attrs: dict[str, Any]
    rows: np.ndarray  # (n,) int64 rows into the store's images table
    vectors: np.ndarray  # (n, dim)
    paths: np.ndarray  # (n,) relative paths, aligned with vectors
    labels: np.ndarray
    splits: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"<Space {self.name!r}: {len(self)} vectors of dim {self.dim} ({self.vectors.dtype}), "
                f"backbone {self.attrs.get('backbone')!r}>")


@dataclass
class Store:
    """A read-only snapshot of a store (main file plus published journal parts)."""

    path: Path
    root: str
    images: dict[str, np.ndarray]
    failures: list[dict[str, Any]]
    spaces: dict[str, Space]
    journal_parts: int = 0

    @property
    def n_images(self) -> int:
        return len(self.images["path"])

    def __repr__(self) -> str:
        lines = [f"<Store {str(self.path)!r}: {self.n_images} images, {len(self.failures)} failures, "
                 f"{len(self.spaces)} space(s)" + (f", {self.journal_parts} journal part(s)" if self.journal_parts else "")]
        lines += [f"  {sp.name}: {len(sp)} x {sp.dim} {sp.vectors.dtype} ({sp.attrs.get('backbone')})"
                  for sp in list(self.spaces.values())[:20]]
        if len(self.spaces) > 20:
            lines.append(f"  ... {len(self.spaces) - 20} more")
        return "\n".join(lines) + ">"

    def space(self, name: str | None = None) -> Space:
        """Return the space called ``name``; without a name, the first frozen space.

        Frozen spaces (embedded by a backbone as published) come before fine-tuned ones, so
        adding a fine-tuned space never changes what the default means.
        """
        if not self.spaces:
            raise StoreError(f"{self.path} has no embedding space yet: run `embedstore embed FOLDER --store {self.path}`")
        if name is None:
            frozen = [sp for sp in self.spaces.values() if not sp.attrs.get("parent_space")]
            return (frozen or list(self.spaces.values()))[0]
        if name not in self.spaces:
            raise StoreError(f"{self.path} has no space {name!r}; it has: {', '.join(self.spaces)}")
        return self.spaces[name]

    def abspath(self, rel: str) -> str:
        """Absolute path of an image given its stored (relative) path."""
        return rel if os.path.isabs(rel) else os.path.join(self.root, rel)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what ``embedstore info --json`` prints)."""
        labels = [x for x in self.images["label"] if x]
        splits = [x for x in self.images["split"] if x]
        return {
            "store": str(self.path),
            "root": self.root,
            "images": self.n_images,
            "failures": len(self.failures),
            "labels": {k: int(v) for k, v in zip(*np.unique(labels, return_counts=True))} if labels else {},
            "splits": {k: int(v) for k, v in zip(*np.unique(splits, return_counts=True))} if splits else {},
            "journal_parts": self.journal_parts,
            "spaces": [
                {
                    "name": s.name,
                    "backbone": s.attrs.get("backbone"),
                    "dim": s.dim,
                    "rows": len(s),
                    "dtype": str(s.vectors.dtype),
                    "weights_sha256": s.attrs.get("weights_sha256"),
                    "created": s.attrs.get("created"),
                }
                for s in self.spaces.values()
            ],
        }


def journal_dir(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".journal")


def lock_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".lock")


def open_store(path: str | os.PathLike, retries: int = 5) -> Store:
    """Open a store for reading: the main file plus any published journal parts.

    Raises ``FileNotFoundError`` when there is no store and ``StoreError`` when it is unreadable.
    """
    path = Path(path)
    for attempt in range(retries):
        try:
            return _read_snapshot(path)
        except FileNotFoundError:
            # a writer folded the journal into the main file while we read it: read again
            if attempt == retries - 1 or not (path.exists() or journal_dir(path).exists()):
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _read_snapshot(path: Path) -> Store:
    if not path.exists() and not journal_dir(path).exists():
        raise FileNotFoundError(
            f"no store at {path}: create one with `embedstore embed FOLDER --store {path}`"
        )
    state = _State()
    if path.exists():
        state.apply(_read_file(path), seq=0)
    base_seq = state.journal_seq
    parts = [(s, p) for s, p in list_parts(path) if s > base_seq]
    for seq, part in parts:
        state.apply(_read_file(part), seq=seq)
    return state.to_store(path, journal_parts=len(parts))


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


@dataclass
class _FileData:
    attrs: dict[str, Any]
    images: dict[str, np.ndarray]
    failures: dict[str, np.ndarray]
    spaces: dict[str, tuple[dict[str, Any], np.ndarray, np.ndarray]]  # attrs, rows, vectors


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


def _read_columns(group: h5py.Group, columns: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for c in columns:
        ds = group[c]
        out[c] = ds.asstr()[()] if c in _STR_COLUMNS else ds[()]
        if c in _STR_COLUMNS:
            out[c] = np.asarray(out[c], dtype=object)
    return out


def _unreadable(path: Path, e: Exception) -> Exception:
    """The error for a store file that h5py cannot read: missing, or damaged (naming the fix)."""
    if not path.exists():
        return FileNotFoundError(str(path))
    return StoreError(
        f"{path} is not a readable embedstore file ({type(e).__name__}: {e}). "
        "Restore it from a backup, or move it aside and run `embedstore embed` again to rebuild it."
    )


def _read_file(path: Path) -> _FileData:
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
                spaces[name] = (_decode_attrs(g.attrs), g["rows"][()], g["vectors"][()])
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


# --------------------------------------------------------------------------- merging


class _State:
    """Accumulates the main file and journal parts in order; later rows win."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}
        self.journal_seq = 0
        self.cols: dict[str, list] = {c: [] for c in IMAGE_COLUMNS}
        self.index: dict[str, int] = {}
        self.changed_seq: dict[int, int] = {}  # row -> seq at which its content last changed
        self.space_attrs: dict[str, dict[str, Any]] = {}
        self.chunks: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = {}
        self.failures: dict[tuple[str, str], dict[str, Any]] = {}

    def apply(self, data: _FileData, seq: int) -> None:
        if seq == 0:
            self.attrs = dict(data.attrs)
            self.journal_seq = int(self.attrs.get("journal_seq", 0))  # checked by check_file
        elif not self.attrs:
            self.attrs = {k: v for k, v in data.attrs.items() if k != "journal_seq"}
        mapping = np.empty(len(data.images["path"]), dtype=np.int64)
        for j, p in enumerate(data.images["path"]):
            i = self.index.get(p)
            if i is None:
                i = self.index[p] = len(self.cols["path"])
                for c in IMAGE_COLUMNS:
                    self.cols[c].append(data.images[c][j])
            else:
                if self.cols["hash"][i] != data.images["hash"][j]:
                    self.changed_seq[i] = seq
                for c in IMAGE_COLUMNS:
                    self.cols[c][i] = data.images[c][j]
            mapping[j] = i
        for name, (attrs, rows, vectors) in data.spaces.items():
            if name in self.space_attrs:
                check_space_compatible(self.space_attrs[name], attrs, name)
            else:
                self.space_attrs[name] = attrs
            mapped = mapping[rows] if len(rows) else rows.astype(np.int64)
            self.chunks.setdefault(name, []).append((mapped, vectors, seq))
            for r in mapped:
                self.failures.pop((self.cols["path"][r], name), None)
        for j in range(len(data.failures["path"])):
            rec = {c: data.failures[c][j] for c in FAILURE_COLUMNS}
            self.failures[(rec["path"], rec["space"])] = rec

    def images(self) -> dict[str, np.ndarray]:
        out = {}
        for c in IMAGE_COLUMNS:
            dtype = object if c in _STR_COLUMNS else (np.int64 if c == "size" else np.float64)
            out[c] = np.array(self.cols[c], dtype=dtype) if self.cols[c] else np.empty(0, dtype=dtype)
        return out

    def space_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The surviving (rows, vectors) of a space: last vector per row, stale ones dropped."""
        chunks = self.chunks.get(name, [])
        dim = int(self.space_attrs[name]["dim"])
        if not chunks:
            return np.empty(0, np.int64), np.empty((0, dim), np.float16)
        rows = np.concatenate([c[0] for c in chunks])
        vectors = np.concatenate([c[1] for c in chunks])
        seqs = np.concatenate([np.full(len(c[0]), c[2], dtype=np.int64) for c in chunks])
        keep = np.ones(len(rows), dtype=bool)
        if self.changed_seq:
            changed = np.array([self.changed_seq.get(int(r), -1) for r in rows])
            keep &= seqs >= changed
        # last occurrence of each row wins
        rev_rows = rows[::-1]
        _, first_in_rev = np.unique(rev_rows, return_index=True)
        last = np.zeros(len(rows), dtype=bool)
        last[len(rows) - 1 - first_in_rev] = True
        keep &= last
        order = np.argsort(rows[keep], kind="stable")
        return rows[keep][order], vectors[keep][order]

    def to_store(self, path: Path, journal_parts: int) -> Store:
        images = self.images()
        spaces = {}
        for name, attrs in self.space_attrs.items():
            rows, vectors = self.space_arrays(name)
            spaces[name] = Space(
                name, attrs, rows, vectors, images["path"][rows], images["label"][rows], images["split"][rows]
            )
        return Store(
            path=path,
            root=str(self.attrs.get("root", "")),
            images=images,
            failures=list(self.failures.values()),
            spaces=spaces,
            journal_parts=journal_parts,
        )


def check_space_compatible(old: dict[str, Any], new: dict[str, Any], name: str) -> None:
    """Refuse to mix vectors of different backbones or weights in one space."""
    for key in ("backbone", "weights_sha256", "dim"):
        if old.get(key) != new.get(key):
            raise StoreError(
                f"space {name!r} holds {key}={old.get(key)!r} but this run has {key}={new.get(key)!r}: "
                "choose another space name with --space NAME"
            )


# --------------------------------------------------------------------------- writing


def _write_columns(group: h5py.Group, columns: Sequence[str], data: dict[str, Sequence]) -> None:
    for c in columns:
        values = data[c]
        if c in _STR_COLUMNS:
            arr = np.array([str(v) for v in values], dtype=h5py.string_dtype())
        else:
            arr = np.asarray(values, dtype=np.int64 if c == "size" else np.float64)
        group.create_dataset(c, data=arr, maxshape=(None,), chunks=(_chunk_rows(len(arr), 4096),))


def _write_attrs(target: h5py.AttributeManager, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        if v is None:
            continue
        target[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v


def write_file(
    path: Path,
    attrs: dict[str, Any],
    images: dict[str, Sequence],
    spaces: dict[str, tuple[dict[str, Any], np.ndarray, np.ndarray]],
    failures: dict[str, Sequence],
) -> None:
    """Write a complete store file atomically: temporary file, fsync, rename, fsync folder.

    The HDF5 image is built in memory and written with plain file I/O: HDF5 itself can crash
    when the disk fills up while it flushes, whereas a failed ``write`` is an ordinary error.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"no space left to write {path}: free disk space and run again; finished work is kept") from e
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StoreError(f"cannot write {path} ({e.strerror}): choose a writable --store location") from e
        raise


def _chunk_rows(n: int, cap: int) -> int:
    """Chunk length: the whole dataset when small (journal parts stay small), else ``cap``."""
    return max(1, min(n, cap))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def snapshot(self) -> Store | None:
        """The current content (main file plus journal), or None for a new store."""
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
        dtype = np.dtype(space_attrs.get("dtype", "float16"))
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
            jdir / f"part-{self._seq:010d}.h5",
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
        with h5py.File(source, "r", locking=False) as f:
            if f.attrs.get("format") != FORMAT:
                raise StoreError(f"{source} is not an embedstore file: only shard or store files can be merged")
        data = _read_file(source)  # a damaged file is refused before it becomes a part of this store
        for name in data.spaces:
            validate_space_name(name)
        jdir = journal_dir(self.path)
        jdir.mkdir(exist_ok=True)
        self._seq += 1
        dest = jdir / f"part-{self._seq:010d}.h5"
        tmp = jdir / f".{dest.name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(jdir)

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


def failure_keys(store: Store | None) -> dict[tuple[str, str], tuple[int, float]]:
    """(path, space) -> (size, mtime) of recorded failures."""
    if store is None:
        return {}
    return {(f["path"], f["space"]): (int(f["size"]), float(f["mtime"])) for f in store.failures}

