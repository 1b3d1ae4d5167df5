"""Tables of images: CSV/TSV lists and Parquet files whose rows name local files or URLs.

A row gives a path or URL, and optionally a label and a split. Columns are found by the header's
names (path/url/image/..., label/class, split; ``columns={"path": ..., "label": ..., "split": ...}``
or the CLI's ``--path-column``/``--label-column``/``--split-column`` name others). A CSV without a
header is read as ``path[,label[,split]]`` rows; its first row is a header when it names a known
column and holds no image path or URL. Paths: relative (to the table's folder, or its URL), absolute,
``file://`` (a local file, keyed by the URL as listed), ``http(s)://`` and any other fsspec URL
(``s3://``, ``gs://``, ``memory://``: the filesystem's package must be installed, checked here
before anything is written). A URL's key is the URL as listed. The table itself may be an fsspec URL.

Crash safety: this module only reads.
"""
from __future__ import annotations

import csv
import os
import posixpath
from pathlib import Path
from typing import Iterator, Mapping

from ..errors import CollectionError, EmbedOptionError
from .items import SPLITS, ImageItem, image_extensions, is_url, relative_key
from .remote import Fetch, check_scheme, file_url_path

PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "image", "image_path", "url", "image_url",
                "uri")
LABEL_COLUMNS = ("label", "class")
SPLIT_COLUMNS = ("split",)
KEYS = {"path": (PATH_COLUMNS, "--path-column"), "label": (LABEL_COLUMNS, "--label-column"),
        "split": (SPLIT_COLUMNS, "--split-column")}
PARQUET = (".parquet", ".pq")

Row = tuple[str, str, str, str]  # where (file and line/row), path, label, split


def check_columns(columns: Mapping[str, str] | None, allowed: tuple[str, ...], what: str) -> dict[str, str]:
    """``columns`` as a dict whose keys are among ``allowed``; EmbedOptionError naming the wrong key."""
    out = dict(columns or {})
    wrong = [k for k in out if k not in allowed]
    if wrong or not all(isinstance(v, str) and v for v in out.values()):
        raise EmbedOptionError(f"columns={out!r}: {what} takes keys {', '.join(allowed)}, each naming a column "
                               "(e.g. columns={'path': 'url', 'label': 'category'})")
    return out


def discover_table(source: str, columns: Mapping[str, str] | None = None,
                   fetch: Fetch | None = None) -> tuple[str, list[ImageItem]]:
    """The root and the items of a CSV/TSV/Parquet table (a local path or an fsspec URL)."""
    cols = check_columns(columns, tuple(KEYS), "a table")
    if is_url(source) and source.split("://", 1)[0].lower() == "file":
        source = file_url_path(source)
    remote = is_url(source)
    name = source.rsplit("/", 1)[-1] if remote else Path(source).name
    root = source.rsplit("/", 1)[0] if remote else str(Path(source).resolve().parent)
    rows = _Rows(root, remote, fetch or Fetch())
    try:
        if Path(name).suffix.lower() in PARQUET:
            items = [it for row in _parquet_rows(source, name, cols) if (it := rows.item(*row)) is not None]
        else:
            items = [it for row in _csv_rows(source, name, root, remote, cols) if (it := rows.item(*row)) is not None]
    except UnicodeDecodeError as e:
        raise CollectionError(f"{source} is not UTF-8 text (byte {e.start}): save the list as UTF-8 CSV") from None
    except csv.Error as e:
        raise CollectionError(f"{source} is not a readable CSV list ({e}): write one path[,label[,split]] per row "
                              "or a header row naming the columns") from None
    except FileNotFoundError:
        raise CollectionError(f"{source} does not exist: pass a folder, a tar shard, or a CSV/Parquet table") from None
    except OSError as e:
        raise CollectionError(f"cannot read {source} ({e.strerror or e}): check that it is a readable table") from None
    if not items:
        raise CollectionError(f"{source}: no images listed (the table is empty or holds only a header or comments): "
                              "list one image per row, path[,label[,split]]")
    return root, items


class _Rows:
    """Turns a row's path or URL into an item (the schemes checked once each)."""

    def __init__(self, root: str, remote: bool, fetch: Fetch):
        self.root, self.remote, self.fetch = root, remote, fetch
        self.schemes: set[str] = set()

    def item(self, where: str, value: str, label: str, split: str) -> ImageItem | None:
        value = value.strip()
        if not value:
            return None
        split = SPLITS.get(split.lower(), split)
        if not is_url(value) and self.remote and not value.startswith("/"):
            value = posixpath.join(self.root, value)  # relative to a table that is itself a URL
        if is_url(value):
            scheme = value.split("://", 1)[0].lower()
            if scheme == "file":  # a local file: read and planned like one, keyed by the URL
                return ImageItem(file_url_path(value), value, label, split)
            if scheme not in self.schemes:
                check_scheme(scheme, f"{where}: {value}")
                self.schemes.add(scheme)
            return ImageItem(value, value, label, split, source=self.fetch)
        full = value if os.path.isabs(value) else os.path.normpath(os.path.join(self.root, value))
        return ImageItem(full, relative_key(full, self.root), label, split)


def _open(source: str, mode: str, **kwargs: str):
    """The table's file: a local path, or an fsspec URL."""
    if is_url(source):
        import fsspec

        return fsspec.open(source, mode, **kwargs).open()
    return open(source, mode, **kwargs)


def _csv_rows(source: str, name: str, root: str, remote: bool, cols: dict[str, str]) -> Iterator[Row]:
    indices: tuple[int | None, int | None, int | None] | None = None  # path, label, split
    with _open(source, "rt", encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a leading BOM is dropped
        dialect = csv.excel_tab if name.lower().endswith(".tsv") else csv.excel
        reader = csv.reader(f, dialect)
        for row in reader:
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            if indices is None:
                indices = _header(name, root, remote, row, cols)
                if indices is not None:
                    continue  # the header row
                indices = (0, 1, 2)
            where = f"{name}, line {reader.line_num}"
            path = _cell(row, indices[0])
            if "\x00" in path:
                raise csv.Error(f"line {reader.line_num} holds a NUL byte")
            yield where, path, _cell(row, indices[1]), _cell(row, indices[2])


def _cell(row: list[str], index: int | None) -> str:
    return row[index].strip() if index is not None and index < len(row) else ""


def _header(name: str, root: str, remote: bool, row: list[str], cols: dict[str, str]) -> tuple | None:
    """Column indices when ``row`` is the header, else None (a data row).

    With ``cols`` the first row is the header. Otherwise it is one when it names a known column and
    no cell is an image path, a URL, or (the first) an existing file."""
    cells = [c.strip() for c in row]
    if not cols:
        known = PATH_COLUMNS + LABEL_COLUMNS + SPLIT_COLUMNS
        exts = image_extensions()
        if not any(c.lower() in known for c in cells) or any(
                is_url(c) or os.path.splitext(c)[1].lower() in exts for c in cells):
            return None
        if not remote and os.path.exists(os.path.join(root, cells[0])):
            return None
    return pick_columns(name, cells, cols)


def pick_columns(name: str, names: list[str], cols: dict[str, str]) -> tuple[int | None, int | None, int | None]:
    """Indices of the path, label and split columns among ``names`` (``cols`` first, then known names)."""
    lower = [n.lower() for n in names]

    def find(key: str) -> int | None:
        defaults, option = KEYS[key]
        if key in cols:
            want = cols[key]
            found = next((i for i, n in enumerate(names) if n == want), None)
            found = found if found is not None else next((i for i, n in enumerate(lower) if n == want.lower()), None)
            if found is None:
                raise CollectionError(f"{name} has no column {want!r} ({option}): its columns are "
                                      f"{', '.join(names)}")
            return found
        return next((i for i, n in enumerate(lower) if n in defaults), None)

    path = find("path")
    if path is None:
        raise CollectionError(f"{name}: no column names the images (its columns are {', '.join(names)}): pass "
                              f"--path-column NAME (columns={{'path': NAME}}), or name it one of "
                              f"{', '.join(PATH_COLUMNS)}")
    return path, find("label"), find("split")


def _parquet_rows(source: str, name: str, cols: dict[str, str]) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(source, "rb") as handle:
        try:
            pf = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, pa.ArrowException) as e:
            raise CollectionError(f"{source} is not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        picked = pick_columns(name, names, cols)
        wanted = [names[i] for i in picked if i is not None]
        n = 0
        for batch in pf.iter_batches(batch_size=65536, columns=sorted(set(wanted), key=wanted.index)):
            data = {c: batch.column(c).to_pylist() for c in batch.schema.names}
            for k in range(batch.num_rows):
                n += 1
                cells = ["" if i is None or data[names[i]][k] is None else str(data[names[i]][k]) for i in picked]
                if "\x00" in cells[0]:
                    raise CollectionError(f"{source}, row {n}: the path holds a NUL byte")
                yield f"{name}, row {n}", cells[0], cells[1], cells[2]
