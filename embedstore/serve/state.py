"""What a search server keeps loaded: the store snapshot, each space's index, backbones and heads.

``ServedStore`` opens the store once and reads vectors on demand (the out-of-core store), reads
each space's index once, and loads a space's backbone on the first query that needs it. A
background thread watches the store file and its journal: when an ``embed`` run adds rows, the
new snapshot replaces the old one between two queries, the rows the index lacks are searched
exactly (``search.query.knn``), and the index is brought up to date in the background
(``index.build_index``, incremental) and swapped in when it is ready. An index that
``embedstore index`` rebuilt meanwhile is read again too. Queries are answered all along.

Crash safety: the store is only read. The one thing written is a space's index, through
``index.build_index`` (a new generation published atomically, under the index's build lock), and
only for spaces that had one and only with ``reindex``; a kill at any moment leaves the store
untouched and the index files either as they were or at their new generation.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbones.registry import has_backbone
from ..errors import EmbedstoreError, NotFoundError, QueryError
from ..index.files import LoadedIndex, index_files, index_is_current, load_built_index
from ..store import Space, Store, open_store
from ..store.format import journal_dir

log = logging.getLogger("embedstore.serve")
RETRY_SECONDS = 10  # a failed index update (e.g. the store changed under it) is tried again after this


@dataclass(frozen=True)
class ServeOptions:
    """How a server answers: limits on what a request may ask, and how it follows the store."""

    device: str = "auto"  # where query images and texts are embedded
    max_upload_bytes: int = 20 << 20  # an uploaded image (or request body) larger than this is refused (413)
    max_k: int = 1000  # neighbours a query may ask for, offset included
    max_queries: int = 256  # rows, paths, vectors or texts in one request
    refresh_seconds: float = 2.0  # how often the store is checked for rows an embed run added (0: never)
    reindex: bool = True  # bring a stale index up to date in the background (writes the index files only)
    max_batch: int = 32  # concurrent image queries embedded in one forward pass
    heads: dict[str, Path] = field(default_factory=dict)  # name -> saved head folder


def _signature(path: Path) -> tuple[Any, ...]:
    """What changes when a writer publishes: the main file's identity and the journal's part names."""
    try:
        st = os.stat(path)
        main = (st.st_ino, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        main = None
    jdir = journal_dir(path)
    try:
        parts = tuple(sorted(os.listdir(jdir)))
    except (FileNotFoundError, NotADirectoryError):
        parts = ()
    return main, parts


class ServedStore:
    """One store served: a snapshot swapped when the store changes, and its spaces' indexes."""

    def __init__(self, path: str | os.PathLike, options: ServeOptions | None = None) -> None:
        from ..heads.saved import load_head  # heads import sklearn: only a server needs them here

        self.path = Path(path)
        self.options = options or ServeOptions()
        self._lock = threading.RLock()
        # Searches take turns: h5py runs one HDF5 call at a time (its global lock), so threads reading at once
        # only add lock and GIL hand-offs (1M-row store, re-ranked index, 4 threads: 37 queries/s together,
        # 55 taking turns). Decoding and embedding uploads happen outside it, beside the search of others.
        self.read_lock = threading.Lock()
        self.events: deque[dict[str, Any]] = deque(maxlen=50)  # what the watcher did, newest last (/api/info)
        self._signature = _signature(self.path)
        self.store: Store = open_store(self.path)
        self.indexes: dict[str, LoadedIndex | None] = {}
        for name in self.store.spaces:
            self.indexes[name] = self._read_index(self.store, name)
        self.heads = {name: load_head(folder) for name, folder in self.options.heads.items()}
        for name, head in self.heads.items():
            if head.space not in self.store.spaces:
                raise QueryError(f"head {name!r} ({head.path}) was trained on space {head.space!r}, which "
                                 f"{self.path} does not have (it has {', '.join(self.store.spaces) or 'none'}): "
                                 "serve the store it was trained on")
            head.check_space(self.store.space(head.space).attrs, f"space {head.space!r} of {self.path}")
        self._models: dict[str, Any] = {}  # weights sha256 -> QueryModel (backbone + batcher)
        self._model_lock = threading.Lock()
        self._building: set[str] = set()
        self._failed_builds: dict[str, float] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ----------------------------------------------------------------------- lifetime

    def start(self) -> None:
        """Load the default space's backbone in the background (a first image query waits for it rather
        than loading it itself) and start following the store (unless ``refresh_seconds`` is 0)."""
        threading.Thread(target=self._preload, name="embedstore-preload", daemon=True).start()
        if self.options.refresh_seconds > 0 and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="embedstore-watch", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        for model in list(self._models.values()):
            model.close()

    def _preload(self) -> None:
        st, sp, _ = self.space(None) if self.store.spaces else (None, None, None)
        if sp is None or not has_backbone(sp.attrs):
            return
        try:
            self.model(sp)
            self._event("backbone loaded", space=sp.name, backbone=sp.attrs.get("backbone"))
        except Exception as e:  # noqa: BLE001 - an image query will report it; vector queries work without
            self._event("backbone not loaded", space=sp.name, error=f"{type(e).__name__}: {e}")

    def _event(self, what: str, **info: Any) -> None:
        log.info("%s %s", what, info)
        self.events.append({"time": round(time.time(), 3), "event": what, **info})

    # ----------------------------------------------------------------------- reading

    def snapshot(self) -> tuple[Store, dict[str, LoadedIndex | None]]:
        """The store and indexes to answer one query with (consistent with each other)."""
        with self._lock:
            return self.store, dict(self.indexes)

    def space(self, name: str | None) -> tuple[Store, Space, LoadedIndex | None]:
        """(store, space, its index) for one query; QueryError naming the spaces there are."""
        st, indexes = self.snapshot()
        if name is not None and name not in st.spaces:
            raise NotFoundError(f"{self.path} has no space {name!r}: it has {', '.join(st.spaces) or 'none'}")
        sp = st.space(name)
        return st, sp, indexes.get(sp.name)

    def model(self, sp: Space) -> Any:
        """The loaded backbone of a space (loaded once per weights checksum, on first use)."""
        from ..search.query import check_has_backbone
        from .embed import QueryModel

        check_has_backbone(sp)
        key = str(sp.attrs.get("weights_sha256"))
        with self._model_lock:
            if key not in self._models:
                self._models[key] = QueryModel(sp.attrs, device=self.options.device, max_batch=self.options.max_batch)
            return self._models[key]

    def loaded_models(self) -> list[Any]:
        """The backbones loaded so far (each with its batcher's counts)."""
        with self._model_lock:
            return list(self._models.values())

    def _read_index(self, st: Store, name: str) -> LoadedIndex | None:
        try:
            return load_built_index(st, name)
        except EmbedstoreError as e:  # a damaged index: exact search meanwhile, and say why
            self._event("index unreadable", space=name, error=str(e))
            return None

    # ----------------------------------------------------------------------- following the store

    def refresh(self) -> bool:
        """Take up what changed on disk: a new store snapshot, a rebuilt index; True if anything did."""
        changed = False
        sig = _signature(self.path)
        if sig != self._signature:
            try:
                new = open_store(self.path)
            except EmbedstoreError as e:
                self._event("store unreadable", error=str(e))
                return False
            with self._lock:
                old, self.store, self._signature = self.store, new, sig
                for name in new.spaces:
                    self.indexes.setdefault(name, None)
            self._event("store changed", generation=new.generation, images=new.n_images,
                        previous_generation=old.generation)
            changed = True
        st, indexes = self.snapshot()
        for name in st.spaces:
            loaded = indexes.get(name)
            on_disk = index_files(self.path, name)
            if (loaded is None and on_disk.sidecar.exists()) or (
                    loaded is not None and on_disk.generation != loaded.files.generation):
                fresh = self._read_index(st, name)
                if fresh is not None:
                    with self._lock:
                        self.indexes[name] = fresh
                    self._event("index loaded", space=name, generation=on_disk.generation, rows=fresh.info.get("rows"))
                    changed = True
                    loaded = fresh
            if loaded is not None and self.options.reindex and not index_is_current(st, st.space(name), loaded):
                self._start_build(name)
        return changed

    def _watch(self) -> None:
        while not self._stop.wait(self.options.refresh_seconds):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the watcher must never take the server down
                self._event("refresh failed", error=f"{type(e).__name__}: {e}")

    def _start_build(self, name: str) -> None:
        with self._lock:
            if name in self._building or time.time() - self._failed_builds.get(name, 0) < RETRY_SECONDS:
                return
            self._building.add(name)
        threading.Thread(target=self._build, args=(name,), name=f"embedstore-index-{name}", daemon=True).start()

    def _build(self, name: str) -> None:
        from ..index.build import build_index

        try:
            info = build_index(self.path, space=name)
            self._event("index updated", space=name, mode=info.get("mode"), rows=info.get("rows"),
                        seconds=info.get("build_seconds"))
            self.refresh()
        except Exception as e:  # noqa: BLE001 - a failed build leaves the old index serving
            self._failed_builds[name] = time.time()
            self._event("index update failed", space=name, error=f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._building.discard(name)

    @property
    def building(self) -> list[str]:
        return sorted(self._building)
