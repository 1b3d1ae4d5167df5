"""Planning a run: which items of a collection are new or changed for a space, and path rebasing.

Crash safety: reads only (file stats, content hashes of touched files and tar members, the store's
columns at the listed rows); a URL is never fetched to plan.
"""
from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .._hashing import hash_bytes, hash_file
from ..data.collection import ImageItem, is_url, relative_key
from ..data.remote import RETRIED_ERRORS
from ..store import Store, failure_keys, open_store


def plan(items: list[ImageItem], store: Store | None, space: str) -> tuple[list[ImageItem], int, int]:
    """Split items into (to embed, unchanged, known failures) for one space.

    A file (or a tar member, a dataset row: their ``stat``) embedded with the same size and mtime is
    unchanged; with the same size only, when its content hash is the same. A URL embedded in the
    space is unchanged without being fetched (URLs are taken as immutable). A recorded failure is
    skipped while the size and mtime are those recorded; a URL's, unless it was transient (a
    timeout, HTTP 5xx: :data:`embedstore.data.remote.RETRIED_ERRORS`), which is tried again.
    Reads the store's columns only at the rows of the listed items (path keys, not every path).
    """
    if store is None:
        return list(items), 0, 0
    rows = store.rows_of([it.rel for it in items])
    sp = store.spaces.get(space)
    embedded = sp.positions_of(rows) >= 0 if sp is not None else np.zeros(len(items), bool)
    embedded &= rows >= 0
    candidates = np.flatnonzero(embedded)
    size = np.full(len(items), -1, np.int64)
    mtime = np.full(len(items), np.nan)
    size[candidates] = store.image_column("size", rows[candidates])
    mtime[candidates] = store.image_column("mtime", rows[candidates])
    failed = failure_keys(store)
    todo, unchanged, known_failed = [], 0, 0
    to_hash: list[tuple[int, ImageItem]] = []
    for j, it in enumerate(items):
        prev = failed.get((it.rel, space))
        if it.source is not None and it.stat is None:  # a URL: immutable, never fetched to plan
            if embedded[j]:
                unchanged += 1
            elif prev is not None and prev[1] not in RETRIED_ERRORS:
                known_failed += 1
            else:
                todo.append(it)
            continue
        if it.stat is not None:
            now, regular = it.stat, True
        else:
            try:
                st = os.stat(it.path)
            except OSError:
                todo.append(it)  # the reader records why
                continue
            now, regular = (st.st_size, st.st_mtime), stat.S_ISREG(st.st_mode)  # never hash a FIFO or device
        if embedded[j] and regular:
            if size[j] == now[0] and mtime[j] == now[1]:
                unchanged += 1
                continue
            if size[j] == now[0]:
                to_hash.append((j, it))  # touched: unchanged if the content is identical
                continue
        if prev is not None and prev[0] == now:
            known_failed += 1
            continue
        todo.append(it)
    if to_hash:
        stored = store.image_column("hash", rows[[j for j, _ in to_hash]])
        for (j, it), h in zip(to_hash, stored):
            if h == _content_hash(it):
                unchanged += 1
            else:
                todo.append(it)
    return todo, unchanged, known_failed


def _content_hash(item: ImageItem) -> str:
    """The content hash of an item's bytes ("" when they cannot be read: the reader records why)."""
    try:
        if item.source is None:
            return hash_file(item.path)
        return hash_bytes(item.source.read(item, item.stat[0] if item.stat else 1 << 62))
    except Exception:  # noqa: BLE001 - unreadable now: planned as work, the reader records the failure
        return ""


def rebase(item: ImageItem, root: str) -> ImageItem:
    """Express an item's key relative to the store's original root (absolute when outside it). URLs and
    dataset keys stay as they are; a tar member's key follows its shard's path."""
    if item.source is not None:
        rel = item.source.rekey(item, root)
        return item if rel is None else replace(item, rel=rel)
    if is_url(item.rel):  # a file:// row: keyed by its URL
        return item
    return replace(item, rel=relative_key(item.path, root))


def rebase_onto(store: Store | None, root: str, items: Sequence[ImageItem]) -> tuple[str, Sequence[ImageItem]]:
    """(root, items) as ``store`` records them: items rebased onto its root when it has another one."""
    if store is not None and store.root and store.root != root:
        return store.root, [rebase(it, store.root) for it in items]
    return root, items


def plan_view(path: Path) -> Store | None:
    """The store at ``path`` (main file plus published journal parts; no vector read), or None."""
    try:
        return open_store(path)
    except FileNotFoundError:
        return None
