"""Path keys: a 64-bit hash of each stored path, and a sorted lookup from keys to image rows.

The images table keeps ``images/key`` (BLAKE2b-64 of the UTF-8 path) beside ``images/path`` so a
path -> row lookup reads 8 bytes per row instead of every path string; candidates are confirmed
against the stored path, so a hash collision can never map a path to the wrong row.

Crash safety: pure computation; nothing here reads or writes files.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np


def path_keys(paths: Iterable[str]) -> np.ndarray:
    """The ``images/key`` of each path: the first 8 bytes of BLAKE2b(path) as uint64."""
    raw = b"".join(hashlib.blake2b(str(p).encode("utf-8", "surrogateescape"), digest_size=8).digest() for p in paths)
    return np.frombuffer(raw, dtype="<u8").copy()


class KeyIndex:
    """key -> value over sorted runs (a log-structured merge: runs of similar size are merged).

    ``add`` costs O(n log n) amortised over all additions; ``lookup`` searches at most
    ~log2(total / smallest run) sorted arrays. Adding a key again replaces its value (the
    latest wins; a value of -1 reads as absent). For path keys a collision of two paths maps
    them to one row: callers confirm by path.
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, rows)

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self._runs)

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Index ``rows`` under ``keys`` (arrays of the same length)."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        run = (np.asarray(keys)[order], np.asarray(rows, dtype=np.int64)[order])
        run = _last_of_each(*run)
        while self._runs and len(self._runs[-1][0]) <= 2 * len(run[0]):
            k0, r0 = self._runs.pop()
            k = np.concatenate([k0, run[0]])
            r = np.concatenate([r0, run[1]])
            o = np.argsort(k, kind="stable")
            run = _last_of_each(k[o], r[o])
        self._runs.append(run)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The row indexed under each key (the most recently added run wins), -1 where none."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.full(len(keys), -1, dtype=np.int64)
        for k, r in self._runs:  # oldest first: later runs overwrite
            if not len(k):
                continue
            at = np.minimum(np.searchsorted(k, keys), len(k) - 1)
            hit = k[at] == keys
            out[hit] = r[at[hit]]
        return out

    def discard(self, keys: np.ndarray) -> None:
        """Forget ``keys`` (they read as absent again)."""
        self.add(np.asarray(keys, dtype=np.uint64), np.full(len(keys), -1, np.int64))

    def candidates(self, key: int) -> np.ndarray:
        """Every row indexed under one key (more than one only on a hash collision)."""
        found = []
        for k, r in self._runs:
            lo, hi = np.searchsorted(k, key, "left"), np.searchsorted(k, key, "right")
            found.append(r[lo:hi])
        return np.concatenate(found) if found else np.empty(0, np.int64)


def _last_of_each(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of sorted keys (stable, oldest first), keep the last value of each key."""
    if len(keys) < 2:
        return keys, values
    last = np.append(keys[1:] != keys[:-1], True)
    return keys[last], values[last]
