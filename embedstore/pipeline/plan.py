"""Planning a run: which items of a collection are new or changed for a space, and path rebasing.

Crash safety: reads only (file stats, content hashes of touched files, the store's rows without vectors).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Sequence

from .._hashing import hash_file
from ..data.collection import ImageItem
from ..store import Store, failure_keys, open_store


def plan(items: list[ImageItem], store: Store | None, space: str) -> tuple[list[ImageItem], int, int]:
    """Split items into (to embed, unchanged, known failures) for one space."""
    if store is None:
        return list(items), 0, 0
    index = {p: i for i, p in enumerate(store.images["path"])}
    embedded = set(store.spaces[space].rows.tolist()) if space in store.spaces else set()
    failed = failure_keys(store)
    todo, unchanged, known_failed = [], 0, 0
    for it in items:
        try:
            st = os.stat(it.path)
        except OSError:
            todo.append(it)  # the reader records why
            continue
        row = index.get(it.rel)
        if row is not None and row in embedded and stat.S_ISREG(st.st_mode):  # never hash a FIFO or device
            if store.images["size"][row] == st.st_size and store.images["mtime"][row] == st.st_mtime:
                unchanged += 1
                continue
            if store.images["size"][row] == st.st_size and store.images["hash"][row] == hash_file(it.path):
                unchanged += 1  # touched but identical content
                continue
        prev = failed.get((it.rel, space))
        if prev is not None and prev == (st.st_size, st.st_mtime):
            known_failed += 1
            continue
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
    """The store at ``path`` without its vectors (main file plus published journal parts), or None.

    Enough to plan what a run or shard still needs; no ``vectors`` dataset is read.
    """
    try:
        return open_store(path, vectors=False)
    except FileNotFoundError:
        return None
