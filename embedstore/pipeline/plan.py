"""Planning a run: which items of a collection are new or changed for a space, and path rebasing.

Crash safety: reads only (file stats, content hashes of touched files, the main store file).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .._hashing import hash_file
from ..data.collection import ImageItem
from ..errors import StoreError
from ..store import FAILURE_COLUMNS, IMAGE_COLUMNS, Space, Store, failure_keys
from ..store.integrity import check_rows
from ..store.format import _decode_attrs, _read_columns


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
    """The main file of a store without its vectors: enough to plan what a shard still needs.

    Journal parts of a killed local run are not read; their images are embedded again, which
    the merge resolves (the later vector of a row wins), so nothing is lost or duplicated.
    """
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = _decode_attrs(f.attrs)
            images = _read_columns(f["images"], IMAGE_COLUMNS)
            fail = _read_columns(f["failures"], FAILURE_COLUMNS)
            spaces = {}
            for name, g in f["spaces"].items():
                rows = g["rows"][()]
                check_rows(path, f"spaces/{name}", rows, len(images["path"]))
                spaces[name] = Space(name, _decode_attrs(g.attrs), rows, np.empty((len(rows), 0), np.float16),
                                     images["path"][rows], images["label"][rows], images["split"][rows])
    except (OSError, KeyError, ValueError) as e:
        raise StoreError(f"{path} is not a readable embedstore file ({e}): move it aside or restore it") from e
    failures = [{c: fail[c][j] for c in FAILURE_COLUMNS} for j in range(len(fail["path"]))]
    return Store(path, str(attrs.get("root", "")), images, failures, spaces)
