"""A space out of the store, in the layout clip-retrieval writes and autofaiss / embedding-reader read.

:func:`export_vectors` writes::

    OUT/img_emb/img_emb_<i>.npy          (n_i, dim) in the space's stored dtype (float16 stays float16)
    OUT/metadata/metadata_<i>.parquet    n_i rows: image_path, label, split (strings; null = none)
    OUT/embedstore.json                  what was exported: store, space, its lineage (attrs), root, parts

``<i>`` is zero-padded to the digits of the part count, as clip-retrieval pads it, so the name order
that embedding-reader (and so autofaiss) reads is the numeric order: row ``j`` of the concatenated
parts, an autofaiss index id, is position ``j`` of the space. ``autofaiss build_index
--embeddings=OUT/img_emb`` runs on it unchanged, and ``embedstore import`` reads it back.

``image_path`` is the path as the store records it: relative to the store root (absolute only where
the store holds an absolute path), or absolute for every row with ``absolute_paths=True``.
``embedstore.json`` records the root, and ``import_vectors`` of an export takes that root as its
default, so export then import gives a space of the same paths, vectors, labels and splits in the same
order, with images that resolve. Failures the store recorded have no vector and are not exported.

Memory is one chunk (``chunk_rows`` rows of vectors and their three columns), whatever ``part_rows``
and the space's size: each part is streamed chunk by chunk into its two files, the vectors read in
the stored dtype (no float32 copy) and written as they were read.

Crash safety: a part's two files are written under temporary names (``.NAME.tmp-PID``, which neither
the import nor embedding-reader reads), fsync'd, then renamed in, the metadata first and the vectors
last; ``embedstore.json`` is written (atomically) after the last part. A killed export leaves
complete parts 0..k-1 and at most the hidden temporary files of part k, which no reader lists (an
export into a folder without parts removes such leftovers). An output folder that holds parts
already is refused: nothing is ever overwritten. One export at a time per folder (a kernel lock on
``OUT/.embedstore-export.lock``, which stays behind, hidden).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from .. import __version__
from .._atomic import atomic_write, atomic_write_text
from ..data.items import is_url
from ..errors import ExportError
from ..store import open_store
from ..store.locks import try_lock
from ..store.tables import space_table, string_array
from ..utils import timed

PART_ROWS = 1_000_000  # rows per part: clip-retrieval's default write batch size
CHUNK_ROWS = 65536  # rows read and written at a time: 65536 x 512 float16 is 64 MiB
MANIFEST = "embedstore.json"
LAYOUT = "clip-retrieval"  # the layout's name, as the importer's ``source_format`` records it
PATH_COLUMN, OPTIONAL_COLUMNS = "image_path", ("label", "split")  # the metadata columns the importer reads
LOCK = ".embedstore-export.lock"
FOLDERS = ("img_emb", "metadata")
_TEMP = re.compile(r"^\.(img_emb_\d+\.npy|metadata_\d+\.parquet|embedstore\.json)\.tmp-\d+$")

Progress = Callable[[int, int], None]  # (rows written so far, rows in all)


def part_names(n_parts: int) -> list[str]:
    """The part numbers as clip-retrieval writes them: zero-padded to the digits of the part count."""
    return [str(i).zfill(len(str(n_parts))) for i in range(n_parts)]


def exported_root(folder: str | os.PathLike) -> str | None:
    """The store root an export recorded in ``folder/embedstore.json``, absolute (None: not an export of ours)."""
    try:
        root = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8")).get("root")
    except (OSError, ValueError, AttributeError):  # clip-retrieval's own output has no manifest
        return None
    return root if isinstance(root, str) and os.path.isabs(root) else None


def _existing(out: Path) -> list[Path]:
    """What in ``out`` an export would overwrite or be confused with (hidden temporary files aside)."""
    found = [out / MANIFEST] if (out / MANIFEST).exists() else []
    for sub in FOLDERS:
        d = out / sub
        if d.is_dir():
            found += [p for p in sorted(d.iterdir()) if not p.name.startswith(".")]
        elif d.exists():
            found.append(d)
    return found


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: give the folder to write img_emb/ and metadata/ into")
    found = _existing(out)
    if found:
        shown = ", ".join(str(p.relative_to(out)) for p in found[:3])
        shown += f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise ExportError(f"{out} holds an export already ({shown}): export never overwrites; give an empty or "
                          f"new folder, or move {out} aside first")


def _remove_stale_temps(out: Path) -> None:
    """Hidden temporary files a killed export left (only ours, by their exact name; we hold the lock)."""
    for d in (out, *(out / s for s in FOLDERS)):
        for p in (d.iterdir() if d.is_dir() else ()):
            if _TEMP.match(p.name):
                p.unlink(missing_ok=True)


def _metadata(sp: Any, st: Any, a: int, b: int, absolute: bool) -> Any:
    """The parquet columns of positions ``a:b``: image_path, label, split (null = none)."""
    table = space_table(sp, ("path",) + OPTIONAL_COLUMNS, np.arange(a, b))
    if absolute:
        paths = [p if is_url(p) else os.path.abspath(st.abspath(p)) for p in table.column("path").to_pylist()]
        table = table.set_column(0, "path", string_array(np.array(paths, dtype=object), empty_is_null=False))
    return table.rename_columns([PATH_COLUMN, *OPTIONAL_COLUMNS])


def _write_part(sp: Any, st: Any, npy: Path, parquet: Path, a: int, b: int, *, chunk_rows: int, absolute: bool,
                stages: dict[str, float], tick: Callable[[int], None]) -> int:
    """Stream positions ``a:b`` into one part's two files; returns their bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dtype = sp.vectors.dtype
    schema = pa.schema([(c, pa.string()) for c in (PATH_COLUMN, *OPTIONAL_COLUMNS)])
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (b - a, sp.dim)}
    t0, read_before = time.perf_counter(), stages.get("read", 0.0)
    sizes = []

    def write_both(tmp_npy: str) -> None:
        def write_metadata(tmp_meta: str) -> None:
            with open(tmp_npy, "wb") as fh, pq.ParquetWriter(tmp_meta, schema) as writer:
                np.lib.format.write_array_header_1_0(fh, header)
                for s in range(a, b, chunk_rows):
                    e = min(b, s + chunk_rows)
                    with timed(stages, "read"):
                        block = np.ascontiguousarray(sp.vectors[s:e])  # the stored dtype, as read
                        table = _metadata(sp, st, s, e, absolute)
                    fh.write(memoryview(block).cast("B"))
                    writer.write_table(table)
                    tick(e - s)

        sizes.append(atomic_write(parquet, write_metadata))  # published first: the part is whole once its vectors are

    sizes.append(atomic_write(npy, write_both))
    stages["write"] = stages.get("write", 0.0) + time.perf_counter() - t0 - (stages.get("read", 0.0) - read_before)
    return sum(sizes)


def _manifest(st: Any, sp: Any, summary: dict[str, Any]) -> str:
    record = {"format": LAYOUT, "written_by": f"embedstore {__version__}",
              "store": os.path.abspath(st.path), "store_uuid": st.uuid, "space": sp.name,
              "generation": sp.generation, "root": os.path.abspath(st.root) if st.root else "",
              "image_path": summary["image_path"], **{k: summary[k] for k in ("parts", "rows", "dim", "dtype")},
              "part_rows": summary["part_rows"], "attrs": sp.attrs}
    return json.dumps(record, indent=2, default=str) + "\n"


def export_vectors(store: str | os.PathLike, out_dir: str | os.PathLike, *, space: str | None = None,
                   part_rows: int = PART_ROWS, absolute_paths: bool = False, chunk_rows: int = CHUNK_ROWS,
                   progress: bool | Progress = False) -> dict[str, Any]:
    """Write one space of ``store`` into ``out_dir`` in clip-retrieval's layout; returns a summary dict.

    Args:
        store: the ``.h5`` store to read.
        out_dir: the output folder (created if missing; refused if it holds an export already).
        space: the space to export (default: the store's default space, as ``search`` picks it).
        part_rows: rows per part (``img_emb_<i>.npy`` / ``metadata_<i>.parquet``).
        absolute_paths: write every ``image_path`` absolute (default: as the store records them).
        chunk_rows: rows read and written at a time (the memory used).
        progress: a progress bar on stderr (True), or a callable ``(rows done, rows in all)``.

    The summary has ``store, space, out_dir, parts, rows, dim, dtype, part_rows, bytes, image_path,
    root, seconds`` (``seconds``: ``{"read", "write", "total"}``).
    """
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    for name, value in (("part_rows", part_rows), ("chunk_rows", chunk_rows)):
        if not isinstance(value, int) or value < 1:
            raise ExportError(f"{name} must be a whole number of rows, at least 1, not {value!r}")
    out = Path(out_dir)
    _check_out(out)  # before anything is opened or created
    with open_store(store) as st:
        sp = st.space(space)
        n = len(sp)
        if not n:
            raise ExportError(f"space {sp.name!r} of {store} has no vectors to export: embed or import into it first")
        names = part_names(-(-n // part_rows))
        out.mkdir(parents=True, exist_ok=True)
        lock = try_lock(out / LOCK)
        if isinstance(lock, str):
            raise ExportError(f"{out} is being exported into by {lock}: wait for it to finish, or choose another "
                              "folder")
        try:
            _check_out(out)  # again, now that no other export can start here
            _remove_stale_temps(out)
            for sub in FOLDERS:
                (out / sub).mkdir(exist_ok=True)
            summary: dict[str, Any] = {
                "store": str(store), "space": sp.name, "out_dir": str(out), "parts": len(names), "rows": n,
                "dim": sp.dim, "dtype": str(sp.vectors.dtype), "part_rows": part_rows, "bytes": 0,
                "image_path": "absolute" if absolute_paths else "stored",
                "root": os.path.abspath(st.root) if st.root else ""}
            done = [0]
            with tqdm(total=n, unit="vec", desc=f"export {sp.name}", file=sys.stderr,
                      disable=progress is not True) as bar:
                def tick(k: int) -> None:
                    done[0] += k
                    bar.update(k)
                    if callable(progress):
                        progress(done[0], n)

                for i, name in enumerate(names):
                    a, b = i * part_rows, min(n, (i + 1) * part_rows)
                    summary["bytes"] += _write_part(
                        sp, st, out / "img_emb" / f"img_emb_{name}.npy", out / "metadata" / f"metadata_{name}.parquet",
                        a, b, chunk_rows=chunk_rows, absolute=absolute_paths, stages=stages, tick=tick)
            summary["bytes"] += atomic_write_text(out / MANIFEST, _manifest(st, sp, summary))
        finally:
            lock.release()
    summary["seconds"] = {"read": round(stages.get("read", 0.0), 3), "write": round(stages.get("write", 0.0), 3),
                          "total": round(time.perf_counter() - t0, 3)}
    return summary
