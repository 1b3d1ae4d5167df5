"""What ``embedstore info`` counts, kept in the main file so that it reads no column: images per
label and per split, and paths stored absolute (outside the collection root).

The tallies are one JSON attribute of the ``images`` group (``tallies``), brought up to date by
the fold for exactly the rows it writes (:func:`update`; a file written whole gets them from
``format.create_columns``), so their cost follows the rows a run
adds, not the store's size. A file written before tallies existed is counted once, a chunk of
the column at a time (:func:`scan`), by the reader that finds none and by the next fold.

Crash safety: the attribute is written inside the fold's copy of the main file, which is
published whole by rename; a file never holds tallies of other rows than its own.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from .format import CATEGORICAL, COLUMN_CHUNK, TALLIES as ATTR, absolute_count

ABSOLUTE = "absolute_paths"
__all__ = ["ATTR", "ABSOLUTE", "absolute_count", "empty", "count_names", "read", "scan", "update", "write"]


def empty() -> dict[str, Any]:
    return {**{c: {} for c in CATEGORICAL}, ABSOLUTE: 0}


def count_names(codes: np.ndarray, names: list[str]) -> Counter:
    """Count of each name among int32 ``codes`` (-1 = none, not counted)."""
    codes = np.asarray(codes)
    n = np.bincount(codes[codes >= 0], minlength=len(names)) if len(names) else np.zeros(0, np.int64)
    return Counter({names[i]: int(n[i]) for i in np.flatnonzero(n)})


def read(images: Any) -> dict[str, Any] | None:
    """The tallies an ``images`` group records, None when it has none (or they are damaged)."""
    text = images.attrs.get(ATTR)
    try:
        t = json.loads(text) if text is not None else None
    except (TypeError, ValueError):
        return None
    ok = (isinstance(t, dict) and isinstance(t.get(ABSOLUTE), int) and all(
        isinstance(t.get(c), dict) and all(isinstance(v, int) and v >= 0 for v in t[c].values()) for c in CATEGORICAL))
    return t if ok else None


def scan(images: Any) -> dict[str, Any]:
    """Tallies counted from an ``images`` group's columns, a chunk at a time (format 1 strings too)."""
    n = int(images["path"].shape[0])
    out = empty()
    for c in CATEGORICAL:
        ds, total = images[c], Counter()
        codes = ds.dtype.kind in "iu"  # format 2 (int32 codes); format 1 stores the names
        names = json.loads(ds.attrs.get("categories", "[]")) if codes else None
        for a in range(0, n, COLUMN_CHUNK):
            if codes:
                total += count_names(ds[a:a + COLUMN_CHUNK], names)
            else:
                total += Counter(v for v in ds.asstr()[a:a + COLUMN_CHUNK] if v)
        out[c] = dict(total)
    out[ABSOLUTE] = sum(absolute_count(images["path"][a:a + COLUMN_CHUNK]) for a in range(0, n, COLUMN_CHUNK))
    return out


def update(tallies: dict[str, Any], column: str, removed: Counter, added: Counter) -> None:
    """Move one categorical column's counts: ``removed`` names out (overwritten rows), ``added`` in."""
    total = Counter(tallies[column])
    total.subtract(removed)
    total.update(added)
    tallies[column] = {k: v for k, v in total.items() if v > 0}


def write(images: Any, tallies: dict[str, Any]) -> None:
    images.attrs[ATTR] = json.dumps(tallies, sort_keys=True)

