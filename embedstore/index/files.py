"""The files of a space's index: where they live, the generation switch, saving, loading and the build lock.

Files, beside ``photos.h5`` in ``photos.h5.index/``::

    <space>.<g>.faiss      the index (``faiss.write_index``), ids = store rows
    <space>.<g>.rows.npy   (n, 2) int64: indexed row, the version (``Space.versions``) of the
                           vector it was given
    <space>.json           sidecar: generation g, kind, factory, parameters, rows, recall@10,
                           latency, seconds, bytes, and the store's ``store_uuid`` and the
                           space's ``space_generation`` it was built from

Staleness costs O(1): an index is current when the sidecar names the store's uuid, the space's
generation and its number of rows (:func:`index_is_current`); which rows changed is worked out
from the versions only when the index is brought up to date. Sidecars from before generations
(no ``space_generation``) are never current: the next build rebuilds them.

Loading memory-maps what FAISS can map (``IO_FLAG_MMAP``: the inverted lists of IVF indexes;
``IO_FLAG_MMAP_IFC``: the codes of flat and HNSW storage), read-only, so a search touches only
the lists it probes; a build that extends an index loads it into memory (``mmap=False``).

Crash safety: a save writes a new generation ``g`` beside the current one (each file through
``_atomic.atomic_write``: a temporary name, fsync'd, renamed), then replaces the sidecar, which is
the single switch from the old generation to the new; only then are the old files removed. A
build killed at any moment leaves the previous index whole and in use. The sidecar records the
sizes of the other two files, so damage is detected when the index is loaded. Builds hold a
kernel lock (``<space>.lock``), so a killed builder never blocks the next one.
"""
from __future__ import annotations

import glob
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np

from .._atomic import atomic_write, atomic_write_text
from ..errors import IndexFileError, SidecarError, StoreError
from ..store.locks import try_lock
from ..store import Space, Store, open_store
from .checks import check_params, check_sidecar, faiss_message, valid_generation
from .tune import set_params

FORMAT = "embedstore-index/1"


@dataclass(frozen=True)
class IndexFiles:
    """Where the index of one space lives."""

    index: Path
    rows: Path
    sidecar: Path
    lock: Path
    generation: int = 0

    def next_generation(self) -> "IndexFiles":
        return _generation_files(self.sidecar.parent, self.sidecar.stem, self.generation + 1)

    def strays(self) -> list[Path]:
        """Files of other generations and temporaries left by a killed build."""
        stem = self.sidecar.stem
        keep = {self.index.name, self.rows.name, self.sidecar.name, self.lock.name}
        found = [*self.sidecar.parent.glob(f"{glob.escape(stem)}.*"),
                 *self.sidecar.parent.glob(f".{glob.escape(stem)}.*.tmp-*")]
        pattern = re.compile(rf"^\.?{re.escape(stem)}\.((\d+\.)?(faiss|rows\.npy)|json)(\.tmp-\d+)?$")
        return [f for f in found if f.name not in keep and pattern.match(f.name)]


def _generation_files(folder: Path, stem: str, generation: int) -> IndexFiles:
    prefix = f"{stem}.{generation}" if generation else stem  # generation 0: the names of embedstore 0.1
    return IndexFiles(folder / f"{prefix}.faiss", folder / f"{prefix}.rows.npy", folder / f"{stem}.json",
                      folder / f"{stem}.lock", generation)


def index_files(store: str | os.PathLike, space: str) -> IndexFiles:
    """The files of the space's current index generation (named by its sidecar; 0 when none)."""
    stem = re.sub(r"[^\w.+-]", "_", space)
    return index_files_at(Path(str(store) + ".index") / f"{stem}.json")


def index_files_at(sidecar: Path) -> IndexFiles:
    """The files a sidecar points to; generation 0 when it is absent, unreadable or tampered with
    (file names come from the space's name and a small generation number only)."""
    try:
        info = json.loads(sidecar.read_text())
        generation = info.get("generation", 0) if isinstance(info, dict) else 0
    except (OSError, ValueError):
        generation = 0
    return _generation_files(sidecar.parent, sidecar.stem, generation if valid_generation(generation) else 0)


@dataclass
class LoadedIndex:
    """An index read back from disk, with its sidecar and the rows it holds."""

    index: faiss.Index
    info: dict[str, Any]
    rows: np.ndarray  # indexed store rows
    versions: np.ndarray  # the version (Space.versions) of each indexed row's vector when it was added
    files: IndexFiles
    # positions of a space this index lacks, for one store generation (see unindexed_positions)
    unindexed: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def k_factor(self) -> int:
        """Candidates per hit re-ranked from the stored vectors (0: the index's own scores are final)."""
        return int(self.info.get("params", {}).get("k_factor", 0))


def index_is_current(st: Store, sp: Space, loaded: LoadedIndex) -> bool:
    """Whether ``loaded`` indexes exactly what space ``sp`` of store ``st`` holds now, in O(1).

    True iff the sidecar names the same store (uuid), the space's current generation and its number
    of rows. Sidecars written before generations were recorded are never current.
    """
    info = loaded.info
    return (info.get("space_generation") is not None and info.get("store_uuid") == st.uuid
            and info.get("space_generation") == sp.generation and info.get("rows") == len(sp))


def unindexed_positions(st: Store, sp: Space, loaded: LoadedIndex) -> np.ndarray:
    """Positions of space ``sp`` whose vector ``loaded`` lacks: rows added since it was built, or
    written again (another version); empty when the index is current.

    Reads the space's rows and versions (16 bytes a row) once per store generation: the answer is
    kept on ``loaded``, so a process that keeps an index open (``embedstore serve``) pays it once
    per change of the store, not once per query.
    """
    if index_is_current(st, sp, loaded):
        return np.empty(0, np.int64)
    key = (st.uuid, sp.name, sp.generation, len(sp))
    if key not in loaded.unindexed:
        same = np.zeros(len(sp), bool)  # an index of no rows holds none of them
        if len(loaded.rows):
            order = np.argsort(loaded.rows, kind="stable")
            rows = loaded.rows[order]
            at = np.minimum(np.searchsorted(rows, sp.rows), len(rows) - 1)
            same = (rows[at] == sp.rows) & (loaded.versions[order][at] == sp.versions)
        loaded.unindexed.clear()  # one generation at a time
        loaded.unindexed[key] = np.flatnonzero(~same).astype(np.int64)
    return loaded.unindexed[key]


def _fix(store: str | os.PathLike, space: str) -> str:
    return f"rebuild it with `embedstore index {store} --space {space}`"


def load_index(store: str | os.PathLike | Store, space: str | None = None, *, mmap: bool = True) -> LoadedIndex:
    """Read the index of a space (default: the store's first frozen space) with its tuned parameters.

    ``mmap``: memory-map what FAISS can map, read-only (see the module docstring); ``False`` reads
    the whole index into memory, as a build that adds to it needs. Raises ``IndexFileError``,
    naming the file and the fix, when it is missing, corrupt, or does not belong to this space's
    backbone (when ``store`` is an open ``Store``, that is checked).
    """
    st = store if isinstance(store, Store) else None
    path = st.path if st is not None else Path(store)
    if space is None:
        space = (st or open_store(path)).space().name
    files = index_files(path, space)
    try:
        return _load_files(files, path, space, st, mmap)
    except IndexFileError:
        latest = index_files(path, space)
        if latest.generation == files.generation:
            raise
        return _load_files(latest, path, space, st, mmap)  # a build switched generations while we read


def load_built_index(st: Store, space: str, *, mmap: bool = True) -> LoadedIndex | None:
    """The space's index as :func:`load_index` reads it (memory-mapped unless ``mmap=False``), or None
    when no index was ever built (neither its sidecar nor its index file exists); damaged files raise
    ``IndexFileError`` as there."""
    files = index_files(st.path, space)
    if not files.sidecar.exists() and not files.index.exists():
        return None
    return load_index(st, space, mmap=mmap)


def mmap_flags(factory: str) -> int:
    """The read-only memory-map flags FAISS supports for an index built with ``factory``."""
    f = factory.upper()
    if "IVF" in f and "RFLAT" not in f:  # inverted lists (array or fast-scan blocks) mapped from the file
        return faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    return faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY  # flat codes (Flat, HNSW storage) mapped


def _read(path: Path, factory: str, mmap: bool) -> faiss.Index:
    if mmap:
        try:
            return faiss.read_index(str(path), mmap_flags(factory))
        except RuntimeError:  # a layout FAISS cannot map: read it whole (a damaged file fails below too)
            pass
    return faiss.read_index(str(path))


def _load_files(files: IndexFiles, path: Path, space: str, st: Store | None, mmap: bool) -> LoadedIndex:
    if not files.sidecar.exists():
        if files.index.exists():
            raise IndexFileError(f"index file {files.index} has no sidecar {files.sidecar.name}: {_fix(path, space)}")
        raise IndexFileError(f"space {space!r} of {path} has no index ({files.index} is missing): "
                             f"build one with `embedstore index {path} --space {space}`")
    try:
        info = check_sidecar(json.loads(files.sidecar.read_text()))
        if info.get("format") != FORMAT:
            raise SidecarError(f"its format is not {FORMAT}")
    except (OSError, ValueError, SidecarError) as e:
        raise SidecarError(f"index sidecar {files.sidecar} is corrupt ({e}): {_fix(path, space)}") from None
    if info.get("generation", 0) != files.generation:
        raise IndexFileError(f"index {files.sidecar} changed while it was read: try again")
    for f, key in ((files.index, "bytes"), (files.rows, "rows_bytes")):
        if not f.exists():
            raise IndexFileError(f"index file {f} is missing: {_fix(path, space)}")
        if f.stat().st_size != info.get(key):
            raise IndexFileError(f"index file {f} is corrupt or from another build (size {f.stat().st_size}, "
                                 f"sidecar says {info.get(key)}): {_fix(path, space)}")
    try:
        index = _read(files.index, info["factory"], mmap)
        state = np.load(files.rows, mmap_mode="r", allow_pickle=False)  # read-only views, paged in when used
    except (RuntimeError, OSError, ValueError) as e:
        raise IndexFileError(f"index file {files.index} is corrupt ({faiss_message(e)}): {_fix(path, space)}") from None
    if index.ntotal != len(state) or len(state) != info.get("rows") or state.ndim != 2:
        raise IndexFileError(f"index file {files.index} holds {index.ntotal} vectors but {files.rows.name} lists "
                             f"{len(state)}: {_fix(path, space)}")
    if st is not None:
        sp = st.space(space)
        if info.get("weights_sha256") != sp.attrs.get("weights_sha256") or info.get("dim") != sp.dim:
            raise IndexFileError(f"index {files.index} was built for other vectors than space {space!r} now holds "
                                 f"(backbone weights or dimension differ): {_fix(path, space)}")
    try:
        check_params(index, info.get("params", {}))
        set_params(index, info.get("params", {}))
    except (ValueError, RuntimeError) as e:
        raise SidecarError(f"index sidecar {files.sidecar} does not fit its index ({faiss_message(e)}): "
                           f"{_fix(path, space)}") from None
    return LoadedIndex(index, info, state[:, 0], state[:, 1], files)


def save_index(index: faiss.Index, rows: np.ndarray, versions: np.ndarray, info: dict[str, Any],
               files: IndexFiles) -> dict[str, Any]:
    """Write a new generation (index, and each indexed row with its vector's version), switch the
    sidecar to it, remove the old one; returns the sidecar. Call it holding the build lock."""
    files.index.parent.mkdir(parents=True, exist_ok=True)
    new = index_files_at(files.sidecar).next_generation()  # the current one: read under the lock
    state = np.stack([rows, versions], axis=1).astype(np.int64)
    info = {**info, "format": FORMAT, "generation": new.generation, "index_file": str(new.index)}
    info["bytes"] = atomic_write(new.index, lambda p: faiss.write_index(index, p))
    info["rows_bytes"] = atomic_write(new.rows, lambda p: _save_npy(p, state))
    write_sidecar(new, info)
    for stray in new.strays():
        stray.unlink(missing_ok=True)
    return info


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


@contextmanager
def build_lock(files: IndexFiles) -> Iterator[None]:
    files.lock.parent.mkdir(parents=True, exist_ok=True)
    held = try_lock(files.lock)
    if isinstance(held, str):
        raise StoreError(f"{files.index} is being built by {held}: wait for it to finish")
    try:
        yield
    finally:
        held.release()


def write_sidecar(files: IndexFiles, info: dict[str, Any]) -> None:
    """Replace the sidecar (atomically) with ``info``."""
    atomic_write_text(files.sidecar, json.dumps(info, indent=2) + "\n")
