"""Which rows a search may return: ``--where`` filters, and each query's own rows (``exclude_self``).

Crash safety: reads the open store only; writes nothing.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ..errors import QueryError
from ..store import Space, Store
from .._hashing import hash_file

WHERE_KEYS = ("label", "split")


def parse_where(where: str | Sequence[str] | None) -> dict[str, str]:
    """``["label=cat", "split=val"]`` -> ``{"label": "cat", "split": "val"}`` (all must hold): the
    CLI's ``--where`` strings, as :func:`embedstore.search.search` takes them."""
    if not where:
        return {}
    out = {}
    for clause in [where] if isinstance(where, str) else where:
        key, sep, value = clause.partition("=")
        if not sep or key.strip() not in WHERE_KEYS:
            raise QueryError(f"cannot read --where {clause!r}: use label=NAME or split=NAME")
        out[key.strip()] = value.strip()
    return out


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
    """Positions passing every filter; QueryError, naming the values that exist, when none does."""
    if not where:
        return None
    keep = np.ones(len(sp), bool)
    columns = {"label": sp.labels, "split": sp.splits}
    for key, value in where.items():
        keep &= np.asarray(columns[key] == value, bool)
    if not keep.any():
        asked = " and ".join(f"{k}={v}" for k, v in where.items())
        have = "; ".join(f"{k}s are {_listing(columns[k])}" for k in where)
        raise QueryError(f"no image of space {sp.name!r} has {asked}: {have}")
    return np.flatnonzero(keep)


def _listing(values: np.ndarray, most: int = 20) -> str:
    names = sorted({str(v) for v in values})
    shown = ", ".join(repr(n) if not n else n for n in names[:most])
    return (shown or "none") + (f" and {len(names) - most} more" if len(names) > most else "")


def self_rows(st: Store, described: list[dict[str, Any]], from_files: bool) -> list[set[int]]:
    """Each query's own store rows: the row queried; for an image file, the row of its path in
    the store, else the rows whose stored content hash equals the file's."""
    out: list[set[int]] = []
    by_path: dict[str, int] | None = None
    by_hash: dict[str, set[int]] | None = None
    for d in described:
        if "row" in d:
            out.append({int(d["row"])})
            continue
        if not from_files or d.get("error"):
            out.append(set())
            continue
        if by_path is None:
            by_path = {str(p): i for i, p in enumerate(st.images["path"])}
            by_hash = {}
            for i, h in enumerate(st.images["hash"]):
                if h:
                    by_hash.setdefault(str(h), set()).add(i)
        f = d["query"]
        rel = os.path.relpath(f, st.root) if st.root else f
        if rel in by_path or f in by_path:
            out.append({by_path.get(rel, by_path.get(f))})
            continue
        try:
            out.append(set(by_hash.get(hash_file(f), set())))
        except OSError:
            out.append(set())
    return [{r for r in rows if r is not None} for rows in out]
