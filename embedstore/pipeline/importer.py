"""Vectors that embedstore did not embed: a clip-retrieval output folder, or arrays in hand, into a space.

:func:`import_vectors` reads the layout clip-retrieval's inference writes::

    DIR/img_emb/img_emb_<i>.npy          float16/float32 array of shape (n_i, dim)
    DIR/metadata/metadata_<i>.parquet    n_i rows: image_path, and label / split where present (null = none)

Parts are matched by their number ``<i>`` and taken in numeric order. Every part is checked from its
headers alone (npy header, parquet footer) before anything is written, then streamed: the array is
memory-mapped and the parquet file read one batch of ``chunk_rows`` rows at a time, so memory holds
one chunk of vectors and of path strings, whatever the folder's size. :func:`add_vectors` writes
arrays already in memory the same way.

The new space's lineage (its attributes) says the vectors were imported and from where:
``backbone="imported"``, ``source_format`` (``"clip-retrieval"`` or ``"arrays"``), ``imported_from``
(the folder, absolute, or the ``source`` given), ``dim``, ``dtype`` and ``weights_sha256=None``.
One space holds one source: importing into a space with other lineage is refused.

Paths are stored as given, relative to the store root (``root``; default: the root an ``embedstore export``
recorded in the folder's ``embedstore.json``, else the import folder; the current directory for arrays).
When the store exists already with another root, relative paths are re-expressed against its root, as
``embed`` does, so both spaces share image rows. An image the store has already keeps its file record
(size, hash, mtime: its vectors in other spaces stay valid) and its label / split wherever the import gives none.

Crash safety: every chunk is one durable journal part (``StoreWriter.commit_arrays``) before the
next is read; the journal is folded into the store only at the end. A run killed at any point
loses nothing it committed, and the next ``import_vectors`` of the same folder into the same space
skips every path the space already has and writes the rest. Bad input found before writing
(layout, shapes, types, row counts, columns) writes nothing; a fault found while streaming (a null
``image_path``, a damaged row group) stops the run after the chunks before it, which are kept.
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from ..choices import STORE_DTYPES
from ..errors import ImportFormatError, StoreError
from ..store import Store, StoreWriter, check_space_compatible, validate_space_name
from ..store.integrity import vector_problems
from .exporter import exported_root

SOURCE_FORMAT = "clip-retrieval"
ARRAYS_FORMAT = "arrays"
ARRAYS_SOURCE = "add_vectors"  # imported_from of arrays given without a source
IMPORTED_BACKBONE = "imported"
CHUNK_ROWS = 65536
PATH_COLUMN = "image_path"
OPTIONAL_COLUMNS = ("label", "split")
_NPY = re.compile(r"^img_emb_(\d+)\.npy$")
_PARQUET = re.compile(r"^metadata_(\d+)\.parquet$")
_LAYOUT = ("clip-retrieval's layout is DIR/img_emb/img_emb_<i>.npy with DIR/metadata/metadata_<i>.parquet "
           "(column image_path) for each part i")

Chunk = tuple[np.ndarray, list, "list | None", "list | None"]  # vectors, paths, labels, splits


@dataclass(frozen=True)
class ImportPart:
    """One part of a clip-retrieval folder: its number, its two files, rows, dim and which columns it has."""

    number: int
    npy: Path
    parquet: Path
    rows: int
    dim: int
    columns: tuple[str, ...]


# --------------------------------------------------------------------------- reading the folder


def _numbered(folder: Path, pattern: re.Pattern, kind: str) -> dict[int, Path]:
    if not folder.is_dir():
        raise ImportFormatError(f"{folder} is missing (or not a folder): {_LAYOUT}; point DIR at "
                                "clip-retrieval's output folder (the one holding img_emb/ and metadata/)")
    found: dict[int, Path] = {}
    for entry in sorted(folder.iterdir()):
        m = pattern.match(entry.name)
        if m is None:
            continue
        i = int(m.group(1))
        if i in found:
            raise ImportFormatError(f"{entry} and {found[i]} are both {kind} part {i}: keep one of them")
        found[i] = entry
    return found


def _open_vectors(path: Path) -> np.ndarray:
    """The part's array memory-mapped (header read only), refusing anything but a 2-D float array."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        why = "it holds Python objects" if "pickle" in str(e) or "objects" in str(e) else str(e)
        raise ImportFormatError(f"{path} cannot be read as a .npy array of vectors ({why}): write each part with "
                                "numpy.save(file, vectors) as float16 or float32 of shape (rows, dim)") from e
    if not isinstance(arr, np.ndarray):
        raise ImportFormatError(f"{path} is an .npz archive, not one .npy array: save one array per part "
                                "with numpy.save(file, vectors)")
    if arr.ndim != 2 or arr.dtype.kind != "f" or arr.shape[1] < 1:
        raise ImportFormatError(f"{path} holds {arr.dtype} of shape {arr.shape}, not vectors: each part must be a "
                                "float16 or float32 array of shape (rows, dim), one row per image")
    return arr


def _open_metadata(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged or foreign files
        raise ImportFormatError(f"{path} cannot be read as a parquet file ({e}): write the metadata with "
                                "pyarrow.parquet.write_table or pandas.DataFrame.to_parquet") from e


def scan_folder(folder: str | os.PathLike) -> list[ImportPart]:
    """The parts of a clip-retrieval folder in numeric order, each checked from its headers alone.

    Raises :class:`ImportFormatError` naming the file and the fix for a missing ``img_emb/`` or
    ``metadata/``, a part without its partner, an unreadable file, an array that is not 2-D float,
    dims that differ between parts, a missing ``image_path`` column, or row counts that differ.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportFormatError(f"no folder {folder}: give the folder clip-retrieval's inference wrote "
                                "(with img_emb/ and metadata/ in it)")
    arrays = _numbered(folder / "img_emb", _NPY, "img_emb")
    tables = _numbered(folder / "metadata", _PARQUET, "metadata")
    for i in sorted(set(arrays) ^ set(tables)):
        have, want = ((arrays[i], folder / "metadata" / f"metadata_{i}.parquet") if i in arrays
                      else (tables[i], folder / "img_emb" / f"img_emb_{i}.npy"))
        raise ImportFormatError(f"{have} has no partner {want}: every part needs both files; restore it, or "
                                f"move {have.name} aside to import the other parts")
    if not arrays:
        raise ImportFormatError(f"{folder} has no parts: {_LAYOUT}")
    parts: list[ImportPart] = []
    for i in sorted(arrays):
        arr = _open_vectors(arrays[i])
        pf = _open_metadata(tables[i])
        names = tuple(pf.schema_arrow.names)
        if PATH_COLUMN not in names:
            raise ImportFormatError(f"{tables[i]} has no {PATH_COLUMN} column (it has: {', '.join(names) or 'none'}): "
                                    f"add one with each image's path, in the row order of {arrays[i].name}")
        if pf.metadata.num_rows != len(arr):
            raise ImportFormatError(f"{tables[i]} has {pf.metadata.num_rows} rows but {arrays[i]} has {len(arr)} "
                                    "vectors: each metadata row describes the vector of the same row; rewrite "
                                    "the part so both have the same rows")
        if parts and arr.shape[1] != parts[0].dim:
            raise ImportFormatError(f"{arrays[i]} has vectors of dim {arr.shape[1]} but {parts[0].npy} has "
                                    f"{parts[0].dim}: one space holds one model's vectors; import the others "
                                    "into another space (--space NAME)")
        cols = (PATH_COLUMN,) + tuple(c for c in OPTIONAL_COLUMNS if c in names)
        parts.append(ImportPart(i, arrays[i], tables[i], len(arr), int(arr.shape[1]), cols))
    return parts


def _strings(batch: Any, name: str, part: ImportPart, start: int) -> list:
    """A parquet column as Python strings (None where null)."""
    import pyarrow as pa

    col = batch.column(batch.schema.get_field_index(name))
    try:
        col = col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ImportFormatError(f"{part.parquet}: column {name} is {col.type}, not text: write it as strings") from e
    if name == PATH_COLUMN and col.null_count:
        at = start + int(np.flatnonzero(np.asarray(col.is_null()))[0])
        raise ImportFormatError(f"{part.parquet}: {PATH_COLUMN} is null in row {at}: give every vector its image "
                                "path (or drop that row from both files of the part)")
    return col.to_pylist()


def iter_part(part: ImportPart, chunk_rows: int = CHUNK_ROWS) -> Iterator[Chunk]:
    """(vectors, paths, labels, splits) of one part, ``chunk_rows`` rows at a time (labels/splits None when absent)."""
    vectors = _open_vectors(part.npy)
    pf = _open_metadata(part.parquet)
    start = 0
    try:
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=list(part.columns)):
            n = batch.num_rows
            paths = _strings(batch, PATH_COLUMN, part, start)
            labels = _strings(batch, "label", part, start) if "label" in part.columns else None
            splits = _strings(batch, "split", part, start) if "split" in part.columns else None
            yield np.asarray(vectors[start:start + n]), paths, labels, splits
            start += n
    except ImportFormatError:
        raise
    except Exception as e:  # a damaged row group (pyarrow's ArrowInvalid, OSError) or array found while reading
        import pyarrow as pa

        if not isinstance(e, (OSError, EOFError, pa.ArrowException)):
            raise
        raise ImportFormatError(f"{part.parquet} or {part.npy} could not be read past row {start} ({e}): restore "
                                "the part; the rows before it are imported, and a rerun resumes") from e


# --------------------------------------------------------------------------- writing


def lineage(dim: int, dtype: str, source_format: str, source: str) -> dict[str, Any]:
    """The space attributes of imported vectors."""
    return {"backbone": IMPORTED_BACKBONE, "weights_sha256": None, "dim": int(dim), "dtype": dtype,
            "source_format": source_format, "imported_from": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _check_dtype(dtype: str) -> str:
    if dtype not in STORE_DTYPES:
        raise ImportFormatError(f"dtype must be one of {', '.join(STORE_DTYPES)}, not {dtype!r} "
                                "(--dtype float16 or float32)")
    return dtype


def _prepare(snap: Store | None, space: str, attrs: dict[str, Any]) -> Any:
    """The space as it is now (None if new), refusing one of other lineage; ``attrs`` take its dtype."""
    prev = snap.spaces.get(space) if snap is not None else None
    if prev is None:
        return None
    check_space_compatible(prev.attrs, attrs, space)
    for key in ("source_format", "imported_from"):
        if prev.attrs.get(key) != attrs.get(key):
            raise StoreError(f"space {space!r} holds vectors imported with {key}={prev.attrs.get(key)!r}, but "
                             f"this import has {key}={attrs.get(key)!r}: one space holds one source; choose "
                             "another space name with --space NAME")
    attrs["dtype"] = str(prev.attrs.get("dtype", attrs["dtype"]))
    attrs["created"] = prev.attrs.get("created", attrs["created"])
    return prev


def _rebaser(snap: Store | None, root: str) -> Any:
    """Paths as the store records them: relative ones re-expressed against an existing store's other root."""
    store_root = snap.root if snap is not None else ""
    if not store_root or os.path.abspath(store_root) == os.path.abspath(root):
        return None

    def rebase(p: str) -> str:
        if os.path.isabs(p) or "://" in p:
            return p
        full = os.path.normpath(os.path.join(root, p))
        rel = os.path.relpath(full, store_root)
        return full if rel.startswith("..") else rel

    return rebase


def _label_columns(snap: Store | None, rows: Any, labels: list | None, splits: list | None) -> dict[str, Any]:
    """commit_arrays' label / split columns. A column left None keeps what the store has (commit_arrays'
    rule, also for size, hash and mtime); a null in a given column keeps an existing image's value.
    ``rows``: the chunk's rows in the store (-1 for new images), or a callable giving them."""
    out: dict[str, Any] = {"labels": labels, "splits": splits}
    gaps = [k for k, v in out.items() if v is not None and any(x in (None, "") for x in v)]
    if not gaps or snap is None or not snap.n_images:
        return out
    rows = rows() if callable(rows) else rows
    known = np.flatnonzero(rows >= 0)
    for key in gaps if len(known) else ():
        col = key[:-1]
        have = snap.image_column(col, rows[known])  # the chunk's known rows only
        values = list(out[key])
        for j, v in zip(known.tolist(), have.tolist()):
            if values[j] in (None, ""):
                values[j] = v
        out[key] = values
    return out


def _write_chunks(writer: StoreWriter, snap: Store | None, prev: Any, space: str, attrs: dict[str, Any],
                  chunks: Iterator[Chunk], root: str, *, skip_existing: bool, bar: Any) -> dict[str, int]:
    """Commit each chunk as one journal part; paths the space has are skipped (or replaced)."""
    rebase = _rebaser(snap, root)
    dtype = np.dtype(attrs["dtype"])
    counts = {"imported": 0, "skipped": 0, "replaced": 0, "failures": 0}
    for vectors, paths, labels, splits in chunks:
        n = len(paths)
        if rebase is not None:
            paths = [rebase(p) for p in paths]
        rows: Any = lambda: snap.rows_of(paths)  # noqa: E731 (looked up only when needed, once)
        if prev is not None and len(prev):
            rows = rows()
            have = prev.positions_of(rows) >= 0
            if skip_existing and have.any():
                keep = np.flatnonzero(~have)
                counts["skipped"] += n - len(keep)
                vectors, paths, rows = vectors[keep], [paths[i] for i in keep], rows[keep]
                labels = None if labels is None else [labels[i] for i in keep]
                splits = None if splits is None else [splits[i] for i in keep]
            elif not skip_existing:
                counts["replaced"] += int(have.sum())
        if paths:
            with np.errstate(over="ignore"):  # a float16 overflow becomes Inf: recorded as a failure
                cast = np.asarray(vectors).astype(dtype, copy=False)
            bad = len(vector_problems(cast))
            writer.commit_arrays(space, attrs, cast, paths, **_label_columns(snap, rows, labels, splits))
            counts["failures"] += bad
            counts["imported"] += len(paths) - bad
        if bar is not None:
            bar.update(n)
    return counts


def import_vectors(store: str | os.PathLike, folder: str | os.PathLike, *, space: str, root: str | None = None,
                   dtype: str = "float16", progress: bool = False, chunk_rows: int = CHUNK_ROWS) -> dict[str, Any]:
    """Import a clip-retrieval output folder into a new space of ``store``; returns a summary dict.

    Args:
        store: the ``.h5`` file to create or extend.
        folder: clip-retrieval's output folder (``img_emb/img_emb_<i>.npy``, ``metadata/metadata_<i>.parquet``).
        space: name of the new space; a rerun into the same space from the same folder resumes.
        root: the store root the ``image_path`` values are relative to (default: the root ``folder/embedstore.json``
            records, for an ``embedstore export``, else ``folder``).
        dtype: stored vector type, ``float16`` (default) or ``float32``; an existing space keeps its own.
        progress: show a progress bar on stderr.
        chunk_rows: rows per committed journal part (and per parquet batch read).

    The summary has ``store, space, source, parts, rows, imported, skipped, failures, dim, dtype,
    seconds``: ``skipped`` rows were in the space already, ``failures`` (NaN/Inf or all-zero vectors)
    are recorded as failures of the store (``embedstore info --failures``).
    """
    t0 = time.perf_counter()
    validate_space_name(space)
    _check_dtype(dtype)
    if chunk_rows < 1:
        raise ImportFormatError(f"chunk_rows must be at least 1, not {chunk_rows} (--chunk-rows)")
    source = os.path.abspath(folder)
    parts = scan_folder(source)  # everything checked before the store is touched
    root = os.path.abspath(root) if root is not None else (exported_root(source) or source)
    total = sum(p.rows for p in parts)
    attrs = lineage(parts[0].dim, dtype, SOURCE_FORMAT, source)
    with StoreWriter(store, root=root) as writer:
        snap = writer.snapshot()
        prev = _prepare(snap, space, attrs)
        chunks = (c for p in parts for c in iter_part(p, chunk_rows))
        with tqdm(total=total, unit="vec", desc=f"import {space}", disable=not progress, file=sys.stderr) as bar:
            counts = _write_chunks(writer, snap, prev, space, attrs, chunks, root, skip_existing=True, bar=bar)
    return {"store": str(store), "space": space, "source": source, "source_format": SOURCE_FORMAT,
            "parts": len(parts), "rows": total, "imported": counts["imported"], "skipped": counts["skipped"],
            "failures": counts["failures"], "dim": parts[0].dim, "dtype": attrs["dtype"],
            "seconds": round(time.perf_counter() - t0, 3)}


def add_vectors(store: str | os.PathLike, vectors: np.ndarray, paths: Sequence[str], *, space: str,
                labels: Sequence[str | None] | None = None, splits: Sequence[str | None] | None = None,
                source: str | None = None, dtype: str = "float16", root: str | None = None,
                chunk_rows: int = CHUNK_ROWS) -> dict[str, Any]:
    """Write vectors in hand (one row per path) into a space of ``store``; returns a summary dict.

    The space's lineage records ``backbone="imported"``, ``source_format="arrays"`` and
    ``imported_from=source`` (a free description, e.g. the file or model the vectors came from;
    default ``"add_vectors"``);
    adding again to the same space needs the same ``source``. A path the space has already gets
    the new vector (``replaced`` in the summary). ``labels`` / ``splits``: one per path, None or
    ``""`` for none. ``root``: what relative paths are relative to (default: the store's root,
    or the current directory for a new store). NaN/Inf or all-zero vectors are recorded as
    failures. Committed ``chunk_rows`` rows at a time, each chunk durable when written.
    """
    t0 = time.perf_counter()
    validate_space_name(space)
    _check_dtype(dtype)
    if chunk_rows < 1:
        raise ImportFormatError(f"chunk_rows must be at least 1, not {chunk_rows}")
    vectors = np.asarray(vectors) if not hasattr(vectors, "shape") else vectors
    paths = [str(p) for p in paths]
    n = len(paths)
    if len(vectors.shape) != 2 or np.dtype(vectors.dtype).kind != "f" or vectors.shape[0] != n:
        raise ImportFormatError(f"got vectors of {vectors.dtype} and shape {tuple(vectors.shape)} for {n} path(s): "
                                "give a float array of shape (len(paths), dim)")
    for name, col in (("labels", labels), ("splits", splits)):
        if col is not None and len(col) != n:
            raise ImportFormatError(f"got {len(col)} {name} for {n} path(s): give one per path (None for none)")
    source = ARRAYS_SOURCE if source is None else str(source)
    attrs = lineage(int(vectors.shape[1]), dtype, ARRAYS_FORMAT, source)
    with StoreWriter(store, root=root) as writer:
        snap = writer.snapshot()
        if root is None:
            root = snap.root if snap is not None and snap.root else os.getcwd()
            writer.root = root
        root = os.path.abspath(root)
        prev = _prepare(snap, space, attrs)
        chunks = ((vectors[s:s + chunk_rows], paths[s:s + chunk_rows],
                   None if labels is None else list(labels[s:s + chunk_rows]),
                   None if splits is None else list(splits[s:s + chunk_rows])) for s in range(0, n, chunk_rows))
        counts = _write_chunks(writer, snap, prev, space, attrs, chunks, root, skip_existing=False, bar=None)
    return {"store": str(store), "space": space, "source": source, "source_format": ARRAYS_FORMAT, "rows": n,
            "added": counts["imported"], "replaced": counts["replaced"], "failures": counts["failures"],
            "dim": int(vectors.shape[1]), "dtype": attrs["dtype"], "seconds": round(time.perf_counter() - t0, 3)}
