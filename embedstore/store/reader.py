"""Reading a store: the main file plus its published journal parts, merged into one ``Store`` snapshot.

Crash safety: nothing here writes. A reader opens every file read-only and without HDF5 locking;
because the writer only ever publishes whole files by atomic rename (``format.write_file``), a
reader sees the main file plus a consistent prefix of the journal of a running job. When a writer
folds the journal into the main file while it is being read, the read is simply done again.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .format import FAILURE_COLUMNS, IMAGE_COLUMNS, _FileData, _read_file, column_dtype, journal_dir, list_parts
from .integrity import check_space_compatible


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


def open_store(path: str | os.PathLike, retries: int = 5, *, vectors: bool = True) -> Store:
    """Open a store for reading: the main file plus any published journal parts.

    Raises ``FileNotFoundError`` when there is no store and ``StoreError`` when it is unreadable.
    ``vectors=False``: a rows-only view for planning (attributes, images, failures, each space's
    attrs and rows; every check but the vector scan), reading no ``vectors`` dataset: its spaces'
    ``vectors`` are empty ``(n, 0)`` arrays of the stored dtype, so ``Space.dim`` is 0 there.
    """
    path = Path(path)
    for attempt in range(retries):
        try:
            return _read_snapshot(path, vectors)
        except FileNotFoundError:
            # a writer folded the journal into the main file while we read it: read again
            if attempt == retries - 1 or not (path.exists() or journal_dir(path).exists()):
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _read_snapshot(path: Path, vectors: bool = True) -> Store:
    if not path.exists() and not journal_dir(path).exists():
        raise FileNotFoundError(
            f"no store at {path}: create one with `embedstore embed FOLDER --store {path}`"
        )
    state = _State()
    if path.exists():
        state.apply(_read_file(path, vectors), seq=0)
    base_seq = state.journal_seq
    parts = [(s, p) for s, p in list_parts(path) if s > base_seq]
    for seq, part in parts:
        state.apply(_read_file(part, vectors), seq=seq)
    return state.to_store(path, journal_parts=len(parts))


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
            dtype = column_dtype(c)
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


def failure_keys(store: Store | None) -> dict[tuple[str, str], tuple[int, float]]:
    """(path, space) -> (size, mtime) of recorded failures."""
    if store is None:
        return {}
    return {(f["path"], f["space"]): (int(f["size"]), float(f["mtime"])) for f in store.failures}

