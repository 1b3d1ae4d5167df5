"""The k-NN graph of a space on disk: batches of each row's nearest neighbours, kept for reuse.

``duplicates`` computes the graph through the index, a batch or (when one re-rank pass over the
stored vectors serves several) a few batches per search; each batch is saved here as soon as its
search is done, so a killed run resumes from the batches it finished, and a second run (another
threshold) reads the graph back instead of searching again. Files, beside the index::

    STORE.h5.index/<space>.knn-<k>-g<space generation>/
        graph.json       what the graph is of: store uuid, space generation, rows, neighbours per
                         row, rows per batch, and its source ("exact" or "index-<index generation>")
        <b>.npy          batch b (positions b*batch ...): a structured (rows, neighbours) array of
                         ``row`` (store row of the neighbour, int64, -1 = none) and ``score`` (cosine)

A graph is used only when graph.json describes the space as it is now (same store, same space
generation, same rows, same k and batch rows, same source); a graph of another generation never is.

Crash safety: every file is written through ``_atomic.atomic_write`` (temporary name, fsync,
rename), graph.json before any batch; a batch counts as done only when its whole file is there
and reads back with the expected shape. A run killed at any moment leaves whole batch files (and
at most ``.*.tmp-PID`` temporaries, never read). Graph folders of other generations of the same
space are removed only once a new graph for it is complete, and only the files named above.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write, atomic_write_text
from ..index.files import index_files
from ..store import Space, Store
from ..utils import cpu_cores

FORMAT = "embedstore-knn-graph/1"
BATCH = 8192  # query rows per batch file
EDGE = np.dtype([("row", "<i8"), ("score", "<f4")])
_BATCH_FILE = re.compile(r"^\d{6}\.npy$")
_TEMPORARY = re.compile(r"^\.(\d{6}\.npy|graph\.json)\.tmp-\d+$")


def graph_folder(st: Store, sp: Space, k: int) -> Path:
    """Where the k-NN graph of this space, at its current generation, lives."""
    sidecar = index_files(st.path, sp.name).sidecar
    return sidecar.parent / f"{sidecar.stem}.knn-{k}-g{sp.generation}"


class GraphCache:
    """The batch files of one graph folder (``describe`` says what the graph must be of)."""

    def __init__(self, folder: Path, describe: dict[str, Any]) -> None:
        self.folder = folder
        self.describe = describe
        self.batch = int(describe["batch"])
        self.rows = int(describe["rows"])
        self.neighbours = int(describe["neighbours"])
        self.batches = -(-self.rows // self.batch) if self.rows else 0

    def recorded(self) -> dict[str, Any] | None:
        """What graph.json says, None when there is none or it is unreadable."""
        try:
            info = json.loads((self.folder / "graph.json").read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def usable(self, source: str) -> bool:
        """Whether the folder holds (a part of) the graph asked for, from ``source``."""
        info = self.recorded()
        return info == {**self.describe, "source": source, "format": FORMAT}

    def start(self, source: str) -> None:
        """Make the folder hold the graph from ``source``: batches of anything else are dropped first."""
        if self.usable(source):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for f in self.folder.iterdir():
            if _BATCH_FILE.match(f.name):
                f.unlink(missing_ok=True)
        atomic_write_text(self.folder / "graph.json",
                          json.dumps({**self.describe, "source": source, "format": FORMAT}, indent=2) + "\n")

    def span(self, b: int) -> slice:
        return slice(b * self.batch, min(self.rows, (b + 1) * self.batch))

    def load(self, b: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(neighbour rows, scores) of batch b, None when it is not done (or its file is damaged)."""
        s = self.span(b)
        try:
            edges = np.load(self.folder / f"{b:06d}.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if edges.dtype != EDGE or edges.shape != (s.stop - s.start, self.neighbours):
            return None
        return edges["row"], edges["score"]

    def done(self) -> list[int]:
        """The batches whose files are there (not read)."""
        return [b for b in range(self.batches) if (self.folder / f"{b:06d}.npy").is_file()]

    def save(self, b: int, rows: np.ndarray, scores: np.ndarray) -> None:
        edges = np.empty(rows.shape, EDGE)
        edges["row"], edges["score"] = rows, scores

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, edges, allow_pickle=False)

        atomic_write(self.folder / f"{b:06d}.npy", write)

    def complete(self) -> list[Path]:
        """Called once every batch is saved: remove this space's graphs of other generations; returns them."""
        stem = self.folder.name.rsplit(".knn-", 1)[0]
        mine = re.compile(rf"^{re.escape(stem)}\.knn-\d+-g(\d+)$")
        gone = []
        for other in self.folder.parent.iterdir():
            m = mine.match(other.name)
            if not m or not other.is_dir() or int(m.group(1)) == self.describe["space_generation"]:
                continue
            for f in other.iterdir():
                if _BATCH_FILE.match(f.name) or f.name == "graph.json" or _TEMPORARY.match(f.name):
                    f.unlink(missing_ok=True)
            try:
                other.rmdir()  # only when nothing else is in it
                gone.append(other)
            except OSError:
                pass
        return gone


def open_cache(st: Store, sp: Space, k: int, neighbours: int, batch: int = BATCH) -> GraphCache:
    """The graph cache of this space for ``k`` (not created on disk until ``start``)."""
    describe = {"store_uuid": st.uuid, "space": sp.name, "space_generation": int(sp.generation), "rows": len(sp),
                "k": int(k), "neighbours": int(neighbours), "batch": int(batch)}
    return GraphCache(graph_folder(st, sp, k), describe)


def threads() -> int:
    """faiss threads for a batched graph: OMP_NUM_THREADS when set, else every core this process may use."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return cpu_cores()
