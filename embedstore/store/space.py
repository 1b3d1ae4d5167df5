"""``Space`` and ``VectorArray``: one embedding space of a store, read on demand.

A space is a sequence of positions; each position has an image row, a vector and a version
(the journal sequence number it was written at). Positions come from the main file (read from
HDF5 when asked) followed by vectors that journal parts add (held in memory: parts are small).
``vectors[a:b]`` / ``vectors[positions]`` read only those rows, in the stored dtype.

Crash safety: read-only.
"""
from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ..errors import StoreError
from .format import CATEGORICAL, IMAGE_COLUMNS

if TYPE_CHECKING:
    from .mainfile import SpaceFile, StoreFile


def _positions(key: Any, n: int) -> np.ndarray:
    """Integer positions selected by ``key`` (int, slice, int array or boolean mask) over ``n`` rows."""
    if isinstance(key, (int, np.integer)):
        i = int(key) + (n if key < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"position {key} is outside a space of {n} vectors")
        return np.array([i], np.int64)
    if isinstance(key, slice):
        return np.arange(*key.indices(n), dtype=np.int64)
    arr = np.asarray(key)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"a boolean mask over a space of {n} vectors needs {n} entries, not {arr.shape}")
        return np.flatnonzero(arr)
    arr = arr.astype(np.int64, copy=False).reshape(-1)
    if len(arr) and (arr.min() < -n or arr.max() >= n):
        raise IndexError(f"positions outside a space of {n} vectors")
    return np.where(arr < 0, arr + n, arr)


class VectorArray:
    """The vectors of a space: array-like, read from the store file on demand.

    Supports ``len``, ``shape``, ``dtype``, ``ndim`` and indexing by int, slice, int array or
    boolean mask (each read returns a numpy array of just those rows). ``np.asarray(v)``,
    ``v[:]`` and ``v.astype(dtype)`` read the whole space into memory.
    """

    def __init__(self, file: "StoreFile | None", space: "SpaceFile | None", keep: np.ndarray | None,
                 extra: np.ndarray) -> None:
        self._file, self._space, self._keep, self._extra = file, space, keep, extra
        n_main = 0 if space is None else (len(space) if keep is None else len(keep))
        self._n_main = n_main
        dim = extra.shape[1] if space is None else int(space.vectors.shape[1])
        self.dtype = np.dtype(extra.dtype if space is None else space.vectors.dtype)
        self.shape = (n_main + len(extra), dim)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        scalar = isinstance(key, (int, np.integer))
        if isinstance(key, tuple):  # v[rows, cols]: rows first, then numpy for the rest
            return self[key[0]][(slice(None),) + tuple(key[1:])]
        pos = _positions(key, len(self))
        main = pos < self._n_main
        if len(pos) and main.all():  # the usual case: no mask copies of what was read
            out = self._file.vectors(self._space, pos if self._keep is None else self._keep[pos])
            return out[0] if scalar else out
        out = np.empty((len(pos), self.shape[1]), self.dtype)
        if main.any():
            p = pos[main]
            if self._keep is not None:
                p = self._keep[p]
            out[main] = self._file.vectors(self._space, p)
        if (~main).any():
            out[~main] = self._extra[pos[~main] - self._n_main]
        return out[0] if scalar else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def astype(self, dtype: Any) -> np.ndarray:
        """The whole space in memory as ``dtype`` (like ``np.asarray(v, dtype)``)."""
        return self[:].astype(dtype, copy=False)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def iter_chunks(self, chunk: int = 32768, dtype: Any = None):
        """(start, block) over the whole space, ``chunk`` rows at a time."""
        for a in range(0, len(self), chunk):
            block = self[a:a + chunk]
            yield a, block if dtype is None else block.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"<VectorArray {self.shape} {self.dtype} (read on demand)>"


class Space:
    """One embedding space: vectors with the image rows they belong to, aligned by position.

    Read what you need: ``vectors[a:b]`` / ``vectors[positions]`` read those rows in the stored
    dtype; ``column(name, positions)`` and ``codes(name)`` read image columns for the positions
    asked. ``vectors[:]`` (or ``np.asarray(space.vectors)``), ``paths``, ``labels`` and ``splits``
    give the whole space in memory: use them only when you want every row.
    """

    def __init__(self, name: str, attrs: dict[str, Any], rows: np.ndarray | Callable[[], np.ndarray],
                 vectors: Any, versions: np.ndarray | Callable[[], np.ndarray] | None = None,
                 store: Any = None, generation: int | None = None,
                 columns: dict[str, np.ndarray] | None = None, identity: bool = False) -> None:
        self.name, self.attrs, self.vectors, self.store = name, attrs, vectors, store
        self._rows, self._versions, self._generation = rows, versions, generation
        self._identity = identity  # position p holds image row p: positions need no read of ``rows``
        self._columns = dict(columns or {})  # values per position, for a detached subset

    @cached_property
    def rows(self) -> np.ndarray:
        """(n,) int64 image row of each position (not necessarily sorted: use ``positions_of``)."""
        return self._rows() if callable(self._rows) else np.asarray(self._rows, dtype=np.int64)

    @cached_property
    def versions(self) -> np.ndarray:
        """(n,) int64: the journal sequence number at which each vector was written."""
        v = self._versions() if callable(self._versions) else self._versions
        return np.zeros(len(self), np.int64) if v is None else np.asarray(v, dtype=np.int64)

    @property
    def generation(self) -> int:
        """The store generation at which this space last changed (0 for an empty space)."""
        if self._generation is not None:
            return int(self._generation)
        return int(self.versions.max()) if len(self) else 0

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @cached_property
    def _sorted(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(order, sorted rows); order is None when the rows are sorted already (the usual case)."""
        rows = self.rows
        if np.all(rows[1:] > rows[:-1]):
            return None, rows
        order = np.argsort(rows, kind="stable")
        return order, rows[order]

    def positions_of(self, rows: Any) -> np.ndarray:
        """Position of each image row in this space, -1 where the row has no vector here."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._identity:
            return np.where((rows >= 0) & (rows < len(self)), rows, -1).astype(np.int64)
        order, srt = self._sorted
        if not len(srt):
            return np.full(len(rows), -1, np.int64)
        at = np.clip(np.searchsorted(srt, rows), 0, len(srt) - 1)
        return np.where(srt[at] == rows, at if order is None else order[at], -1).astype(np.int64)

    def column(self, name: str, positions: Any = None) -> np.ndarray:
        """Image column ``name`` (path, label, split, size, hash, mtime) at ``positions`` (all when None)."""
        if name not in IMAGE_COLUMNS:
            raise StoreError(f"no image column {name!r}: choose one of {', '.join(IMAGE_COLUMNS)}")
        pos = None if positions is None else _positions(positions, len(self))
        if name in self._columns:
            col = self._columns[name]
            return col if pos is None else col[pos]
        if self.store is None:
            raise StoreError(f"space {self.name!r} is a detached subset without a {name!r} column")
        rows = self.rows if pos is None else (pos if self._identity else self.rows[pos])
        return self.store.image_column(name, rows)

    def codes(self, name: str) -> tuple[np.ndarray, list[str]]:
        """(codes, names) of a categorical column (``label`` or ``split``): int32 per position, -1 = none."""
        if name not in CATEGORICAL:
            raise StoreError(f"column {name!r} is not categorical: use 'label' or 'split'")
        if name in self._columns or self.store is None:
            from .format import encode_categories

            codes, names = encode_categories(self.column(name))
            order = np.argsort(names)  # names sorted, as for a store
            remap = np.empty(len(names) + 1, np.int32)
            remap[order] = np.arange(len(names), dtype=np.int32)
            remap[-1] = -1
            return remap[codes], sorted(names)
        if self._identity and len(self) == self.store.n_images:  # position p is row p: no row ids to read
            return self.store.image_codes(name)
        return self.store.image_codes(name, self.rows)

    @property
    def paths(self) -> np.ndarray:
        return self.column("path")

    @property
    def labels(self) -> np.ndarray:
        return self.column("label")

    @property
    def splits(self) -> np.ndarray:
        return self.column("split")

    def to_arrow(self, columns: Any = ("path", "label", "split", "vector"), positions: Any = None) -> Any:
        """``columns`` at ``positions`` (all when None) as a ``pyarrow.Table``; ``vector`` is a fixed-size
        list of the stored dtype over the array read (no float32 copy); no label/split is null."""
        from .tables import space_table

        return space_table(self, columns, None if positions is None else _positions(positions, len(self)))

    def to_pandas(self, columns: Any = ("path", "label", "split", "vector"), positions: Any = None) -> Any:
        """:meth:`to_arrow` as a pandas DataFrame (pandas must be installed)."""
        from .tables import space_frame

        return space_frame(self, columns, None if positions is None else _positions(positions, len(self)))

    def take(self, positions: Any) -> "Space":
        """An in-memory subset of this space (vectors read) at ``positions``, in that order."""
        pos = _positions(positions, len(self))
        vectors = np.asarray(self.vectors[pos]) if len(pos) else np.empty((0, self.dim), self.vectors.dtype)
        cols = {c: self.column(c, pos) for c in ("path", "label", "split")}
        return Space(self.name, self.attrs, self.rows[pos], vectors, self.versions[pos], self.store,
                     self.generation, cols)

    def __repr__(self) -> str:
        return (f"<Space {self.name!r}: {len(self)} vectors of dim {self.dim} ({self.vectors.dtype}), "
                f"backbone {self.attrs.get('backbone')!r}>")


class _Images:
    """The images table as a mapping of whole columns (each read, and kept, when first asked)."""

    def __init__(self, store: Any) -> None:
        self._store, self._cache = store, {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in IMAGE_COLUMNS:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = self._store.image_column(name)
        return self._cache[name]

    def __contains__(self, name: object) -> bool:
        return name in IMAGE_COLUMNS

    def __iter__(self) -> Iterator[str]:
        return iter(IMAGE_COLUMNS)

    def __len__(self) -> int:
        return len(IMAGE_COLUMNS)

    def keys(self) -> tuple[str, ...]:
        return IMAGE_COLUMNS

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        return ((c, self[c]) for c in IMAGE_COLUMNS)
