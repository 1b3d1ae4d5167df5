"""Labelling a store's cached vectors with a saved head, chunk by chunk: a whole space, or only some images.

Crash safety: :func:`predict_store` only reads. :func:`write_predictions` writes its CSV through
:func:`embedstore._atomic.atomic_write` (a temporary file beside the target, renamed into place
when every chunk is written), so a crash leaves the previous file or none, never a partial one.

Memory follows one chunk: over a whole space the vectors are streamed ``chunk`` rows at a time;
over chosen images (``paths``) only their rows are read.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .._atomic import atomic_write
from ..errors import HeadError, StoreError
from ..store import open_store
from .rows import CHUNK
from .saved import Head, load_head

CSV_COLUMNS = ("path", "row", "label", "probability", "top")


def _positions(st: Any, sp: Any, paths: Sequence[str]) -> np.ndarray:
    """Positions in ``sp`` of the store's images ``paths``; StoreError naming what is missing."""
    paths = [str(p) for p in paths]
    rows = np.asarray(st.rows_of(paths), dtype=np.int64)
    absent = [p for p, r in zip(paths, rows) if r < 0]
    if absent:
        raise StoreError(f"{st.path} has no image {absent[0]!r}" + (f" (and {len(absent) - 1} more)" if len(absent) > 1
                         else "") + ": give paths as the store lists them (relative to its root, see "
                         "`embedstore info`)")
    pos = sp.positions_of(rows)
    missing = [p for p, q in zip(paths, pos) if q < 0]
    if missing:
        raise StoreError(f"image {missing[0]!r} of {st.path} has no vector in space {sp.name!r}: embed it with "
                         "`embedstore embed` first, or leave it out")
    return pos


def predict_store(
    head: str | os.PathLike | Head,
    store: str | os.PathLike,
    *,
    space: str | None = None,
    paths: Sequence[str] | None = None,
    top_k: int = 3,
    chunk: int = CHUNK,
) -> Iterator[list[dict[str, Any]]]:
    """Predict a store's cached vectors with a saved head, yielding one list of predictions per chunk.

    Args:
        head: a head folder (or a loaded :class:`Head`).
        store: the ``.h5`` store.
        space: the space to label (default: the head's space name when the store has it, else the
            store's only space); refused when its lineage differs from the head's.
        paths: only these images (the store's relative paths), in this order; default every vector.
        top_k: how many (label, probability) pairs each prediction lists.
        chunk: vectors read and predicted at a time.

    Each prediction is ``{"path", "row", "label", "probability", "top": [{"label", "p"}, ...]}``.
    """
    if int(chunk) < 1:
        raise HeadError(f"chunk must be a whole number >= 1, not {chunk!r}")
    h = head if isinstance(head, Head) else load_head(head)
    with open_store(store) as st:
        name = space if space is not None else (h.space if h.space in st.spaces else None)
        sp = st.space(name)
        positions = None if paths is None else _positions(st, sp, paths)
        classes = np.asarray(h.classes, dtype=object)
        k = max(1, min(int(top_k), len(classes)))
        for at, proba in h.iter_space(sp, positions, where=f"the vectors of space {sp.name!r} of {st.path}",
                                      chunk=int(chunk)):
            pos = at if positions is None else positions[at]
            names = sp.column("path", pos)
            rows = np.asarray(sp.rows)[pos]
            order = np.argsort(-proba, axis=1)[:, :k]
            yield [{"path": str(names[i]), "row": int(rows[i]), "label": str(classes[order[i, 0]]),
                    "probability": round(float(proba[i, order[i, 0]]), 4),
                    "top": [{"label": str(classes[j]), "p": round(float(proba[i, j]), 4)} for j in order[i]]}
                   for i in range(len(pos))]


def write_predictions(out: str | os.PathLike, chunks: Iterator[list[dict[str, Any]]]) -> int:
    """Write predictions (from :func:`predict_store`) to a CSV file chunk by chunk, published atomically.

    Columns: path, row, label, probability, top (``label:p`` pairs joined by ``;``). Returns the
    number of predictions written.
    """
    written = 0

    def write(tmp: str) -> None:
        nonlocal written
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_COLUMNS)
            for preds in chunks:
                w.writerows([p["path"], p["row"], p["label"], p["probability"],
                             ";".join(f"{t['label']}:{t['p']}" for t in p["top"])] for p in preds)
                written += len(preds)

    target = Path(out)
    if target.is_dir() or not target.parent.is_dir():
        raise HeadError(f"cannot write predictions to {out}: " + ("it is a folder" if target.is_dir() else
                        f"folder {target.parent} does not exist") + "; give a CSV file path in an existing folder")
    atomic_write(target, write)
    return written
