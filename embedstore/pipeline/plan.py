"""Planning a run: which items of a collection are new or changed for a space, and path rebasing.

Crash safety: reads only (file stats, content hashes of touched files, the store's columns at the listed rows).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Sequence

import numpy as np

from .._hashing import hash_file
from ..data.collection import ImageItem
from ..store import Store, failure_keys, open_store


def plan(items: list[ImageItem], store: Store | None, space: str) -> tuple[list[ImageItem], int, int]:
    """Split items into (to embed, unchanged, known failures) for one space.

    Reads the store's columns only at the rows of the listed items (path keys, not every path).
    """
    if store is None:
        return list(items), 0, 0
    rows = store.rows_of([it.rel for it in items])
    sp = store.spaces.get(space)
    embedded = sp.positions_of(rows) >= 0 if sp is not None else np.zeros(len(items), bool)
    candidates = np.flatnonzero((rows >= 0) & embedded)
    size = np.full(len(items), -1, np.int64)
    mtime = np.full(len(items), np.nan)
    size[candidates] = store.image_column("size", rows[candidates])
    mtime[candidates] = store.image_column("mtime", rows[candidates])
    failed = failure_keys(store)
    todo, unchanged, known_failed = [], 0, 0
    to_hash: list[tuple[int, ImageItem]] = []
    for j, it in enumerate(items):
        try:
            st = os.stat(it.path)
        except OSError:
            todo.append(it)  # the reader records why
            continue
        if embedded[j] and rows[j] >= 0 and stat.S_ISREG(st.st_mode):  # never hash a FIFO or device
            if size[j] == st.st_size and mtime[j] == st.st_mtime:
                unchanged += 1
                continue
            if size[j] == st.st_size:
                to_hash.append((j, it))  # touched: unchanged if the content is identical
                continue
        prev = failed.get((it.rel, space))
        if prev is not None and prev == (st.st_size, st.st_mtime):
            known_failed += 1
            continue
        todo.append(it)
    if to_hash:
        stored = store.image_column("hash", rows[[j for j, _ in to_hash]])
        for (j, it), h in zip(to_hash, stored):
            if h == hash_file(it.path):
                unchanged += 1
            else:
                todo.append(it)
    return todo, unchanged, known_failed


def rebase(item: ImageItem, root: str) -> ImageItem:
    """Express an item's path relative to the store's original root (absolute when outside it)."""
    rel = os.path.relpath(item.path, root)
    if rel.startswith(".."):
        rel = item.path
    return ImageItem(item.path, rel, item.label, item.split, item.refusal)


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
