"""The rows a head uses, read and nothing more: labelled positions, their splits, and their vectors in chunks.

Crash safety: reads the store only; nothing here writes a file.

Heads, the fine-tune probe and saved-head prediction never convert a whole space: they find the
positions they need from the space's categorical codes (``Space.codes``), read ``vectors[positions]``
``CHUNK`` rows at a time in the stored dtype (float16 usually) and convert each chunk to float32, so
memory follows the rows used, not the collection size.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Any, Iterator, Sequence

import numpy as np

from .._vectors import l2_normalize
from ..errors import HeadError

CHUNK = 65536  # rows per read: 65536 x 512 float32 is 128 MiB at most


@dataclass
class Labelled:
    """The labelled positions of a space (ascending), with their label and split names ("" = no split)."""

    positions: np.ndarray  # int64, ascending
    labels: np.ndarray  # object array of label names, aligned with positions
    splits: np.ndarray  # object array of split names, aligned with positions

    def __len__(self) -> int:
        return len(self.positions)

    def mask(self, split: str) -> np.ndarray:
        """Which of these rows are in ``split``."""
        return self.splits == split

    def subset(self, keep: np.ndarray) -> "Labelled":
        """These rows where ``keep`` (a boolean mask over them) is true, in the same order."""
        return Labelled(self.positions[keep], self.labels[keep], self.splits[keep])


def _names(codes: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Names of int32 codes (-1 gives "")."""
    table = np.array([*[str(n) for n in names], ""], dtype=object)
    return table[np.where(codes >= 0, codes, len(names))]


def labelled_rows(space: Any, positions: np.ndarray | None = None) -> Labelled:
    """The labelled rows of ``space`` (among ``positions`` when given), in position order.

    Reads the space's label and split codes (one int32 per position), never its paths or vectors.
    """
    codes, names = space.codes("label")
    codes = np.asarray(codes)
    keep = codes >= 0
    if positions is not None:
        inside = np.zeros(len(codes), bool)
        inside[np.asarray(positions, dtype=np.int64)] = True
        keep &= inside
    pos = np.flatnonzero(keep).astype(np.int64)
    split_codes, split_names = space.codes("split")
    return Labelled(pos, _names(codes[pos], names), _names(np.asarray(split_codes)[pos], split_names))


def common_positions(spaces: Sequence[Any]) -> list[np.ndarray | None]:
    """For each space, the (ascending) positions of the images embedded in every one of ``spaces``.

    ``None`` for a single space (all its positions). Uses the spaces' row numbers only.
    """
    if len(spaces) < 2:
        return [None for _ in spaces]
    common = reduce(np.intersect1d, [np.asarray(sp.rows, dtype=np.int64) for sp in spaces])
    return [np.sort(sp.positions_of(common)) for sp in spaces]


def _check(space: Any, pos: np.ndarray) -> None:
    n = len(space.vectors)
    if len(pos) and (pos.min() < 0 or pos.max() >= n):
        bad = int(pos[(pos < 0) | (pos >= n)][0])
        raise HeadError(f"position {bad} is outside space {getattr(space, 'name', '?')!r} ({n} vectors): "
                        "give positions from Space.positions_of(rows) (-1 means the row has no vector there)")


def iter_vectors(space: Any, positions: np.ndarray | None = None, *, chunk: int = CHUNK,
                 dtype: Any = np.float32, normalize: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices into ``positions``, float vectors) chunk by chunk: ``chunk`` rows read and converted at a time.

    With ``positions=None`` the whole space is streamed by slices (indices are the positions).
    Positions may come in any order and repeat; each chunk is read in ascending order (what HDF5
    reads fastest) and its rows are given back with their indices into ``positions``.
    """
    convert = (lambda b: l2_normalize(b, dtype)) if normalize else (lambda b: np.asarray(b, dtype=dtype))
    if positions is None:
        n = len(space.vectors)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            yield np.arange(a, b), convert(space.vectors[a:b])
        return
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    _check(space, pos)
    order = np.argsort(pos, kind="stable")
    srt = pos[order]
    for a in range(0, len(srt), chunk):
        p = srt[a:a + chunk]
        uniq, inverse = np.unique(p, return_inverse=True)
        if uniq[-1] - uniq[0] + 1 == len(uniq):  # a run of positions: one slice read
            block = space.vectors[int(uniq[0]):int(uniq[-1]) + 1]
        else:
            block = space.vectors[uniq]
        yield order[a:a + chunk], convert(block)[inverse.reshape(-1)]


def read_vectors(space: Any, positions: np.ndarray, *, chunk: int = CHUNK, dtype: Any = np.float32,
                 normalize: bool = False) -> np.ndarray:
    """``space.vectors[positions]`` as one ``dtype`` array (L2-normalised rows when ``normalize``),
    read ``chunk`` rows at a time in the stored dtype and converted per chunk: memory is the rows asked."""
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    out = np.empty((len(pos), int(space.vectors.shape[1])), dtype=dtype)
    for at, block in iter_vectors(space, pos, chunk=chunk, dtype=dtype, normalize=normalize):
        out[at] = block
    return out
