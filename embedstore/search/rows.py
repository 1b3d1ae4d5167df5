"""Which rows a search may return: ``where`` filters, stored paths as store rows, and each query's
own rows (``exclude_self``).

Everything here reads only what it needs: filters read the label/split codes (or the path column
chunk by chunk for a path prefix), path lookups go through ``Store.rows_of``, and content hashes
are compared chunk by chunk, never as a whole column of Python strings.

Crash safety: reads the open store only; writes nothing.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .._hashing import hash_file
from ..choices import WHERE_KEYS, parse_where  # noqa: F401 (API: the CLI's --where strings as a filter dict)
from ..errors import QueryError
from ..store import Space, Store

CHUNK = 65536  # rows of a string column read at a time


def check_where(where: dict[str, str] | None) -> dict[str, str]:
    """``where`` as a filter dict (``{}`` for None); QueryError naming the fix for anything else."""
    if where is None:
        return {}
    if not isinstance(where, dict):
        raise QueryError(f"where is a dict such as {{'label': 'cat'}}, not {where!r}: "
                         "turn 'label=cat' strings into one with embedstore.search.parse_where")
    for key, value in where.items():
        if key not in WHERE_KEYS:
            raise QueryError(f"cannot filter on {key!r}: where takes the keys {', '.join(WHERE_KEYS)}")
        if not isinstance(value, str):
            raise QueryError(f"where[{key!r}] is a {type(value).__name__}: give the {key} as a string")
    return dict(where)


def filter_positions(sp: Space, where: dict[str, str]) -> np.ndarray | None:
    """Positions passing every filter; QueryError, naming the values that exist, when none does.

    label and split compare integer codes (``Space.codes``); a path prefix reads the path column
    chunk by chunk.
    """
    if not where:
        return None
    keep = np.ones(len(sp), bool)
    names_of: dict[str, list[str]] = {}
    for key, value in where.items():
        if key == "path":
            under = _path_prefix(sp, value)
            names_of[key] = [f"{int(under.sum())} stored paths start with {value!r}"]
            keep &= under
            continue
        codes, names = sp.codes(key)
        names_of[key] = sorted(names) + ([""] if (codes < 0).any() else [])
        if value == "":
            keep &= codes < 0
        elif value in names:
            keep &= codes == names.index(value)
        else:
            keep[:] = False
    if not keep.any():
        asked = " and ".join(f"{k}={v}" for k, v in where.items())
        have = "; ".join(names_of[k][0] if k == "path" else f"{k}s are {_listing(names_of[k])}" for k in where)
        raise QueryError(f"no image of space {sp.name!r} has {asked}: {have}")
    return np.flatnonzero(keep)


def _path_prefix(sp: Space, prefix: str) -> np.ndarray:
    out = np.zeros(len(sp), bool)
    for a in range(0, len(sp), CHUNK):
        paths = np.asarray(sp.column("path", np.arange(a, min(len(sp), a + CHUNK))), dtype=str)
        out[a : a + len(paths)] = np.char.startswith(paths, prefix)
    return out


def _listing(names: list[str], most: int = 20) -> str:
    names = sorted(set(names))
    shown = ", ".join(repr(n) if not n else n for n in names[:most])
    return (shown or "none") + (f" and {len(names) - most} more" if len(names) > most else "")


def stored_rows(st: Store, paths: Sequence[str], *, files: bool = False) -> np.ndarray:
    """Store row of each path, -1 where the store has none: the path as stored, or an absolute path
    (any path, with ``files=True``: a file on this machine) inside the store's root."""
    given = [str(p) for p in paths]
    rows = st.rows_of(given) if given else np.empty(0, np.int64)
    if st.root:
        inside = [os.path.relpath(os.path.abspath(p), st.root) if files or os.path.isabs(p) else p for p in given]
        by_root = st.rows_of(inside) if given else rows
        rows = np.where(by_root >= 0, by_root, rows) if files else np.where(rows >= 0, rows, by_root)
    return np.asarray(rows, np.int64)


def self_rows(st: Store, sp: Space, described: list[dict[str, Any]], from_files: bool) -> list[set[int]]:
    """Each query's own store rows: the row queried; for an image file, the row of its path in
    the store, else the rows of this space whose stored content hash equals the file's."""
    out: list[set[int]] = [{int(d["row"])} if "row" in d else set() for d in described]
    files = [i for i, d in enumerate(described) if "row" not in d and from_files and not d.get("error")]
    if not files:
        return out
    found = stored_rows(st, [described[i]["query"] for i in files], files=True)
    wanted: dict[str, list[int]] = {}
    for i, row in zip(files, found):
        if row >= 0:
            out[i] = {int(row)}
            continue
        try:
            wanted.setdefault(hash_file(described[i]["query"]), []).append(i)
        except OSError:
            pass
    for digest, rows in rows_with_hashes(sp, list(wanted)).items():
        for i in wanted[digest]:
            out[i] |= rows
    return out


def rows_with_hashes(sp: Space, digests: Sequence[str]) -> dict[str, set[int]]:
    """Store rows of this space whose stored content hash (``_hashing.hash_bytes``) is one of
    ``digests``, read chunk by chunk; digests no row has are left out."""
    found: dict[str, set[int]] = {}
    if not digests:
        return found
    keys = np.array(list(digests), dtype=object)
    for a in range(0, len(sp), CHUNK):
        pos = np.arange(a, min(len(sp), a + CHUNK))
        hashes = np.asarray(sp.column("hash", pos), dtype=object).astype(str)
        for p in np.flatnonzero(np.isin(hashes, keys)):
            found.setdefault(hashes[p], set()).add(int(sp.rows[pos[p]]))
    return found
