"""Reading a store: the main file (read on demand) plus its published journal parts, as one ``Store``.

Opening reads the main file's header only; its columns and vectors are read when asked, for the
rows asked. Journal parts (a running job's batches, or what a killed run left) are small and are
read whole, then applied in order on top of the main file: later rows win, and an image whose
content changed drops the vectors written before the change.

Crash safety: nothing here writes. A reader opens every file read-only and without HDF5 locking;
because the writer only ever publishes whole files by atomic rename, an open file never changes
and a reader sees the main file plus a consistent prefix of the journal of a running job. When a
writer folds the journal into the main file while a store is being opened, it is opened again.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .format import (CATEGORICAL, FAILURE_COLUMNS, IDENTITY, IMAGE_COLUMNS, column_dtype, encode_categories,
                     journal_dir, list_parts)
from .integrity import check_space_compatible, merge_runtimes
from .keys import KeyIndex, path_keys
from . import tallies
from .mainfile import StoreFile
from .space import Space, VectorArray, _Images

__all__ = ["Space", "Store", "VectorArray", "open_store", "failure_keys"]


class Store:
    """A read-only snapshot of a store (main file plus published journal parts), read on demand."""

    def __init__(self, path: Path, main: StoreFile | None, parts: list[tuple[int, StoreFile]]) -> None:
        self.path, self._main, self._parts = path, main, parts
        self.journal_parts = len(parts)
        first = main if main is not None else (parts[0][1] if parts else None)
        attrs = first.attrs if first is not None else {}
        self.root = str(attrs.get("root", ""))
        self.uuid = str(attrs.get("uuid", "") or "")  # "" for files written before stores had an identity
        base = main.journal_seq if main is not None else 0
        self.generation = max([base] + [s for s, _ in parts])
        self._n_main = main.n_images if main is not None else 0
        self._index: KeyIndex | None = None
        self._apply_parts()
        self.images = _Images(self)
        self.spaces = {name: self._space(name) for name in self._space_attrs}

    # ----------------------------------------------------------------------- journal parts

    def _key_index(self) -> KeyIndex:
        if self._index is None:
            self._index = KeyIndex()
            if self._main is not None:
                self._index.add(self._main.keys(), np.arange(self._n_main))
        return self._index

    def _apply_parts(self) -> None:
        main = self._main
        self._space_attrs = {n: sp.attrs for n, sp in (main.spaces.items() if main else [])}
        self._failures = {}
        if main is not None:
            f = main.failures()
            for j in range(len(f["path"])):
                rec = {c: f[c][j] for c in FAILURE_COLUMNS}
                self._failures[(rec["path"], rec["space"])] = rec
        self._slot: dict[int, int] = {}  # row -> slot in the overlay columns
        self._ov: dict[str, list] = {c: [] for c in IMAGE_COLUMNS}
        self._changed: dict[int, int] = {}  # row -> seq at which its content last changed
        self._chunks: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = {}
        self.n_images = self._n_main
        for seq, part in self._parts:
            images, failures, spaces = part.read_all()
            keep = set(part.attrs.get("keep_columns") or ())  # columns this part leaves as stored
            paths = images["path"]
            rows = self._rows_for(paths)
            old_hash = np.full(len(rows), None, dtype=object)
            known = np.flatnonzero(rows >= 0)
            from_main = known[[int(rows[j]) not in self._slot for j in known.tolist()]] if len(known) else known
            if len(from_main):
                old_hash[from_main] = self._main.column("hash", rows[from_main])
            for j in np.setdiff1d(known, from_main).tolist():
                old_hash[j] = self._ov["hash"][self._slot[int(rows[j])]]
            fresh: dict[str, int] = {}
            for j in np.flatnonzero(rows < 0).tolist():  # new images: the next row ids, in order
                rows[j] = fresh.setdefault(paths[j], self.n_images + len(fresh))
            if fresh:
                self._key_index().add(path_keys(list(fresh)), np.fromiter(fresh.values(), np.int64, len(fresh)))
                self.n_images += len(fresh)
            for j, row in enumerate(rows.tolist()):
                existing = old_hash[j] is not None
                if existing and "hash" not in keep and old_hash[j] != images["hash"][j]:
                    self._changed[row] = seq
                slot = self._slot.get(row)
                if slot is None:
                    values = [self._value(c, row) if existing and c in keep else images[c][j] for c in IMAGE_COLUMNS]
                    self._slot[row] = len(self._ov["path"])
                    for c, v in zip(IMAGE_COLUMNS, values):
                        self._ov[c].append(v)
                else:
                    for c in IMAGE_COLUMNS:
                        if not (c in keep and existing):
                            self._ov[c][slot] = images[c][j]
            for name, (attrs, local, vectors, _) in spaces.items():
                if name in self._space_attrs:
                    check_space_compatible(self._space_attrs[name], attrs, name)
                    more = merge_runtimes(self._space_attrs[name], attrs)  # as the fold will record them
                    if more:
                        self._space_attrs[name] = {**self._space_attrs[name], **more}
                else:
                    self._space_attrs[name] = attrs
                mapped = rows[local] if len(local) else np.empty(0, np.int64)
                self._chunks.setdefault(name, []).append((mapped, vectors, seq))
                if self._failures:
                    for p in paths[local].tolist():
                        self._failures.pop((p, name), None)
            for j in range(len(failures["path"])):
                rec = {c: failures[c][j] for c in FAILURE_COLUMNS}
                self._failures[(rec["path"], rec["space"])] = rec
        self.failures = list(self._failures.values())
        ov_rows = np.fromiter(self._slot.keys(), np.int64, len(self._slot))
        order = np.argsort(ov_rows)
        self._ov_rows, self._ov_slots = ov_rows[order], np.fromiter(self._slot.values(), np.int64, len(self._slot))[order]
        self._ov_arrays = {c: np.array(v, dtype=column_dtype(c)) if v else np.empty(0, column_dtype(c))
                           for c, v in self._ov.items()}

    def _value(self, column: str, row: int) -> Any:
        slot = self._slot.get(row)
        if slot is not None:
            return self._ov[column][slot]
        return self._main.column(column, np.array([row]))[0] if row < self._n_main else None

    def _rows_for(self, paths: Any) -> np.ndarray:
        """Rows of ``paths`` among the main file and the parts applied so far (-1 = new).

        A few paths against a store without journal parts are matched by scanning the main file's
        keys a chunk at a time (no sorted lookup is built for them, nothing store-sized is kept);
        otherwise the sorted key lookup answers.
        """
        paths = list(paths)
        keys = path_keys(paths)
        if self._index is None and len(paths) <= 16 and self._main is not None and "key" in self._main.images:
            found = self._main.find("key", keys)  # a chunked scan: nothing of the size of the store is kept
        else:
            found = self._key_index().lookup(keys) if paths else np.empty(0, np.int64)
        hit = np.flatnonzero(found >= 0)
        if len(hit):  # confirm: a key collision never maps a path to a wrong row
            stored = np.empty(len(hit), dtype=object)
            in_ov = np.array([int(found[j]) in self._slot for j in hit.tolist()], dtype=bool)
            if (~in_ov).any():
                stored[~in_ov] = self._main.column("path", found[hit[~in_ov]])
            for i in np.flatnonzero(in_ov).tolist():
                stored[i] = self._ov["path"][self._slot[int(found[hit[i]])]]
            for i in np.flatnonzero(stored != np.array(paths, dtype=object)[hit]).tolist():
                found[hit[i]] = self._scan_for(paths[hit[i]])
        return found

    def _scan_for(self, path: str) -> int:
        for row, slot in self._slot.items():
            if self._ov["path"][slot] == path:
                return row
        if self._main is not None:
            return int(self._main.find("path", np.array([path], dtype=object))[0])
        return -1

    # ----------------------------------------------------------------------- spaces

    def _space(self, name: str) -> Space:
        main = self._main
        ms = main.spaces.get(name) if main is not None else None
        attrs = self._space_attrs[name]
        chunks = self._chunks.get(name, [])
        dim = int(attrs.get("dim") or (ms.vectors.shape[1] if ms is not None else chunks[0][1].shape[1]))
        dtype = ms.vectors.dtype if ms is not None else (chunks[0][1].dtype if chunks else np.float16)
        generation = int(ms.attrs.get("generation", main.journal_seq)) if ms is not None else 0
        rows = np.concatenate([c[0] for c in chunks]) if chunks else np.empty(0, np.int64)
        vectors = np.concatenate([c[1] for c in chunks]) if chunks else np.empty((0, dim), dtype)
        seqs = np.concatenate([np.full(len(c[0]), c[2], np.int64) for c in chunks]) if chunks else rows
        keep = np.zeros(len(rows), bool)
        if len(rows):
            _, last = np.unique(rows[::-1], return_index=True)  # the last vector of each row wins
            keep[len(rows) - 1 - last] = True
            if self._changed:
                changed = np.array([self._changed.get(r, -1) for r in rows.tolist()])
                keep &= seqs >= changed
            generation = max(generation, int(seqs.max()))
        order = np.argsort(rows[keep], kind="stable")
        rows, vectors, seqs = rows[keep][order], vectors[keep][order], seqs[keep][order]
        main_keep = None
        if ms is not None and (len(rows) or self._changed):
            touched = np.union1d(rows, np.fromiter(self._changed, np.int64, len(self._changed)))
            main_rows = main.space_rows(ms)
            drop = np.isin(main_rows, touched)
            if drop.any():
                main_keep = np.flatnonzero(~drop)
                generation = max([generation] + [self._changed[r] for r in main_rows[drop].tolist() if r in self._changed])
        array = VectorArray(main, ms, main_keep, vectors)
        # position p holds image row p (the main file says so, and the journal changes nothing here)
        identity = ms is not None and main_keep is None and not len(rows) and bool(ms.rows.attrs.get(IDENTITY))
        extra_rows, extra_seqs = rows, seqs

        def all_rows() -> np.ndarray:
            base = main.space_rows(ms) if ms is not None else np.empty(0, np.int64)
            return np.concatenate([base if main_keep is None else base[main_keep], extra_rows])

        def all_versions() -> np.ndarray:
            base = main.space_versions(ms) if ms is not None else np.empty(0, np.int64)
            return np.concatenate([base if main_keep is None else base[main_keep], extra_seqs])

        return Space(name, attrs, all_rows, array, all_versions, self, generation, identity=identity)

    def space(self, name: str | None = None) -> Space:
        """Return the space called ``name``; without a name, the first frozen space.

        Frozen spaces (embedded by a backbone as published) come before fine-tuned ones, so
        adding a fine-tuned space never changes what the default means.
        """
        if not self.spaces:
            raise StoreError(f"{self.path} has no embedding space yet: run `embedstore embed FOLDER --store {self.path}`")
        if name is None:  # embedded by a backbone first, then imported vectors, then fine-tuned spaces
            ranked = sorted(self.spaces.values(), key=lambda sp: (bool(sp.attrs.get("parent_space")),
                                                                  sp.attrs.get("backbone") == "imported"))
            return ranked[0]
        if name not in self.spaces:
            raise StoreError(f"{self.path} has no space {name!r}; it has: {', '.join(self.spaces)}")
        return self.spaces[name]

    # ----------------------------------------------------------------------- images table

    def _overlaid(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of ``rows`` the journal overrides, their slots in the overlay columns)."""
        if not len(self._ov_rows):
            return np.zeros(len(rows), bool), np.empty(0, np.int64)
        at = np.minimum(np.searchsorted(self._ov_rows, rows), len(self._ov_rows) - 1)
        hit = self._ov_rows[at] == rows
        return hit, self._ov_slots[at[hit]]

    def image_column(self, name: str, rows: Any = None) -> np.ndarray:
        """Images column ``name`` at ``rows`` (the whole table when None), strings as an object array."""
        if name not in IMAGE_COLUMNS:
            raise StoreError(f"no image column {name!r}: choose one of {', '.join(IMAGE_COLUMNS)}")
        whole = rows is None
        rows = np.arange(self.n_images) if whole else np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty(len(rows), dtype=column_dtype(name))
        in_main = rows < self._n_main
        if in_main.any():
            out[in_main] = self._main.column(name, None if whole and in_main.all() else rows[in_main])
        hit, slots = self._overlaid(rows)
        out[hit] = self._ov_arrays[name][slots]
        return out

    def image_codes(self, name: str, rows: Any = None) -> tuple[np.ndarray, list[str]]:
        """(int32 codes, names) of ``label`` or ``split`` at ``rows`` (all when None); -1 = none."""
        if name not in CATEGORICAL:
            raise StoreError(f"column {name!r} is not categorical: use 'label' or 'split'")
        if rows is None and self._main is not None and not len(self._ov_rows) and self.n_images == self._n_main:
            return self._main.codes(name)  # the whole column as stored, with no row ids alongside
        rows = np.arange(self.n_images) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        codes = np.full(len(rows), -1, np.int32)
        names: list[str] = self._main.categories(name) if self._main is not None else []
        in_main = rows < self._n_main
        if in_main.any():
            codes[in_main], names = self._main.codes(name, rows[in_main])
        hit, slots = self._overlaid(rows)
        if hit.any():
            codes[hit], names = encode_categories(self._ov_arrays[name][slots].tolist(), names)
        return codes, names

    def rows_of(self, paths: Any) -> np.ndarray:
        """Row of each stored (relative) path in the images table, -1 where the store has no such image."""
        return self._rows_for([str(p) for p in paths])

    # ----------------------------------------------------------------------- the rest

    @property
    def files(self) -> list[StoreFile]:
        return ([self._main] if self._main is not None else []) + [p for _, p in self._parts]

    def close(self) -> None:
        """Close the store's files (arrays already read stay usable)."""
        for f in self.files:
            f.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def abspath(self, rel: str) -> str:
        """Absolute path of an image given its stored (relative) path."""
        return rel if os.path.isabs(rel) else os.path.join(self.root, rel)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what ``embedstore info --json`` prints); reads no vectors and no
        column: the counts are the main file's tallies (:mod:`.tallies`) moved by the journal's rows."""
        main = self._main
        counts = (tallies.read(main.images) or tallies.scan(main.images)) if main is not None else tallies.empty()
        from_main = self._ov_rows[self._ov_rows < self._n_main]
        for c in CATEGORICAL:
            removed = tallies.count_names(*self._main.codes(c, from_main)) if len(from_main) else {}
            added = Counter(v for v in self._ov_arrays[c].tolist() if v)
            tallies.update(counts, c, removed, added)
            counts[c] = {k: counts[c][k] for k in sorted(counts[c])}
        new_slots = self._ov_slots[self._ov_rows >= self._n_main]  # images the journal adds
        absolute = counts[tallies.ABSOLUTE] + tallies.absolute_count(self._ov_arrays["path"][new_slots].tolist())
        return {
            "store": str(self.path),
            "root": self.root,
            "images": self.n_images,
            "failures": len(self.failures),
            "labels": counts["label"],
            "splits": counts["split"],
            "absolute_paths": absolute,
            "journal_parts": self.journal_parts,
            "generation": self.generation,
            "spaces": [
                {
                    "name": s.name,
                    "backbone": s.attrs.get("backbone"),
                    "dim": s.dim,
                    "rows": len(s),
                    "dtype": str(s.vectors.dtype),
                    "weights_sha256": s.attrs.get("weights_sha256"),
                    "created": s.attrs.get("created"),
                    "runtimes": s.attrs.get("runtimes") or ([s.attrs["runtime"]] if s.attrs.get("runtime") else []),
                    "generation": s.generation,
                }
                for s in self.spaces.values()
            ],
        }

    def __repr__(self) -> str:
        lines = [f"<Store {str(self.path)!r}: {self.n_images} images, {len(self.failures)} failures, "
                 f"{len(self.spaces)} space(s)" + (f", {self.journal_parts} journal part(s)" if self.journal_parts else "")]
        lines += [f"  {sp.name}: {len(sp)} x {sp.dim} {sp.vectors.dtype} ({sp.attrs.get('backbone')})"
                  for sp in list(self.spaces.values())[:20]]
        if len(self.spaces) > 20:
            lines.append(f"  ... {len(self.spaces) - 20} more")
        return "\n".join(lines) + ">"


def open_store(path: str | os.PathLike, retries: int = 5) -> Store:
    """Open a store for reading: the main file's header plus any published journal parts.

    Reads no vectors: ``Space.vectors`` reads rows when indexed. Raises ``FileNotFoundError``
    when there is no store and ``StoreError`` when it is unreadable.
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
        raise FileNotFoundError(f"no store at {path}: create one with `embedstore embed FOLDER --store {path}`")
    opened: list[StoreFile] = []
    try:
        main = StoreFile(path) if path.exists() else None
        if main is not None:
            opened.append(main)
        base_seq = main.journal_seq if main is not None else 0
        parts = []
        for seq, p in list_parts(path):
            if seq > base_seq:
                parts.append((seq, StoreFile(p)))
                opened.append(parts[-1][1])
        return Store(path, main, parts)
    except BaseException:
        for f in opened:
            f.close()
        raise


def failure_keys(store: Store | None) -> dict[tuple[str, str], tuple[tuple[int, float], str]]:
    """(path, space) -> ((size, mtime), error type) of recorded failures."""
    if store is None:
        return {}
    return {(f["path"], f["space"]): ((int(f["size"]), float(f["mtime"])), f["error"]) for f in store.failures}
