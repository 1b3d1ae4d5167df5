"""Hugging Face ``datasets.Dataset`` collections (Python API only; ``pip install 'tl-embedstore[hf]'``).

``embedstore.embed(dataset, "store.h5", columns={...})``: the images come from an ``Image`` column
(``columns["image"]``, default: the column named ``image``, else the first ``Image`` column), read
as the encoded bytes the dataset holds (the feature is cast with ``decode=False``, so Pillow decodes
them in the reader like any file; a row that holds only a local ``path`` reads that file). Labels:
``columns["label"]`` (default ``label`` when present), a ``ClassLabel`` giving its name; splits:
``columns["split"]``, else the dataset's own split (``load_dataset(..., split="train")``).

Keys: ``<name>/<split>/<row>`` where ``name`` is ``dataset.info.dataset_name`` (set by
``load_dataset``), else its builder name, else ``dataset``; ``split`` is left out when the dataset has
none; ``row`` is the row index, or the value of ``columns["key"]`` (unique values: ids, file names).
Give two datasets of one store distinct names (``dataset.info.dataset_name = "..."``) or key
columns. A rerun treats a row whose key is embedded and whose image bytes have the same length as
unchanged (a dataset is not edited in place; after ``shuffle``/``select`` the row index changes:
use a key column there). The dataset reaches the decode worker processes by pickling (arrow-backed
datasets pickle their files, not their rows).

Crash safety: reads only.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ..errors import CollectionError, FileTooLargeError, RefusedFileError
from .items import SPLITS, ByteSource, ImageItem
from .tables import check_columns

KEYS = ("image", "label", "split", "key")


def is_dataset(source: Any) -> bool:
    """Whether ``source`` is a Hugging Face dataset object (without importing ``datasets``)."""
    return type(source).__module__.split(".")[0] == "datasets"


def discover_dataset(dataset: Any, columns: Mapping[str, str] | None = None) -> tuple[str, list[ImageItem]]:
    """The items of a ``datasets.Dataset`` (root ``""``: its keys are not paths)."""
    import datasets
    import pyarrow.compute as pc

    cols = check_columns(columns, KEYS, "a Hugging Face dataset")
    if not isinstance(dataset, datasets.Dataset):
        raise CollectionError(f"{type(dataset).__name__} is not a datasets.Dataset: pass one split "
                              "(dataset['train']), and load an IterableDataset without streaming=True")
    features = dataset.features
    image = cols.get("image") or ("image" if "image" in features else
                                  next((c for c, f in features.items() if isinstance(f, datasets.Image)), None))
    if image is None or image not in features or not isinstance(features[image], datasets.Image):
        raise CollectionError(f"the dataset has no Image column {image or ''} (its columns: "
                              f"{', '.join(f'{c} ({type(f).__name__})' for c, f in features.items())}): "
                              "name it with columns={'image': NAME}")
    label = cols.get("label") or ("label" if "label" in features else None)
    for key in ("label", "split", "key"):
        want = label if key == "label" else cols.get(key)
        if want is not None and want not in features:
            raise CollectionError(f"the dataset has no column {want!r} (columns={{'{key}': ...}}): its columns "
                                  f"are {', '.join(features)}")
    raw = dataset.cast_column(image, datasets.Image(decode=False))
    name = dataset.info.dataset_name or dataset.info.builder_name or "dataset"
    prefix = f"{name}/{dataset.split}" if dataset.split else name
    default_split = SPLITS.get(str(dataset.split or "").lower(), str(dataset.split or ""))
    source = DatasetRows(raw.select_columns([image]), image)
    wanted = [c for c in (image, label, cols.get("split"), cols.get("key")) if c]
    items, seen, row = [], set(), 0
    for batch in raw.select_columns(sorted(set(wanted), key=wanted.index)).with_format("arrow").iter(4096):
        images = batch.column(image).combine_chunks()
        sizes = pc.binary_length(pc.struct_field(images, "bytes")).to_pylist()  # null rows stay null
        paths = pc.struct_field(images, "path").to_pylist()
        labels = _names(batch, label, features)
        splits = _names(batch, cols.get("split"), features)
        keys = _names(batch, cols.get("key"), features)
        for k in range(batch.num_rows):
            key = f"{prefix}/{keys[k] if keys else row}"
            if key in seen:
                raise CollectionError(f"two rows of the dataset have the key {key!r}: name a column of unique "
                                      "values with columns={'key': NAME}, or leave it out (keys are row numbers)")
            seen.add(key)
            split = splits[k] if splits else default_split
            known, refusal = _stat(sizes[k], paths[k], row)
            items.append(ImageItem(key, key, labels[k] if labels else "", SPLITS.get(split.lower(), split),
                                   refusal=refusal, stat=known, locator=(row,), source=source))
            row += 1
    if not items:
        raise CollectionError("the dataset has no rows: pass a dataset with images")
    return "", items


def _names(batch: Any, column: str | None, features: Any) -> list[str]:
    """A column's values as text (a ClassLabel's names), or [] without the column."""
    if column is None:
        return []
    values = batch.column(column).to_pylist()
    feature = features[column]
    if type(feature).__name__ == "ClassLabel":
        return [feature.int2str(v) if v is not None and v >= 0 else "" for v in values]
    return ["" if v is None else str(v) for v in values]


def _stat(size: int | None, path: str | None, row: int) -> tuple[tuple[int, float] | None, str]:
    if size is not None:
        return (size, 0.0), ""
    if path:
        try:
            st = os.stat(path)
            return (st.st_size, st.st_mtime), ""
        except OSError as e:
            return None, f"row {row}: its image is the file {path}, which cannot be read ({e.strerror or e})"
    return None, f"row {row} has no image (neither bytes nor a path)"


class DatasetRows(ByteSource):
    """The byte source of a dataset's rows: ``locator`` = (row,); ``dataset`` holds only the image column."""

    def __init__(self, dataset: Any, column: str):
        self.dataset, self.column = dataset, column

    def read(self, item: ImageItem, max_bytes: int) -> bytes:
        return self._bytes(item, self.dataset[item.locator[0]][self.column], max_bytes)

    def read_many(self, items: Sequence[ImageItem], max_bytes: int) -> list[bytes | Exception]:
        values = self.dataset[[it.locator[0] for it in items]][self.column]
        out: list[bytes | Exception] = []
        for it, value in zip(items, values):
            try:
                out.append(self._bytes(it, value, max_bytes))
            except Exception as e:  # noqa: BLE001 - returned as data, recorded by the reader
                out.append(e)
        return out

    def _bytes(self, item: ImageItem, value: dict, max_bytes: int) -> bytes:
        if item.refusal:
            raise RefusedFileError(item.refusal)
        if item.stat is not None and item.stat[0] > max_bytes:
            raise FileTooLargeError(f"refused: {item.stat[0]} bytes exceeds the limit of {max_bytes} bytes "
                                    "(raise it with --max-file-size / max_bytes)")
        if value.get("bytes") is not None:
            return value["bytes"]
        from .reader import ReadResult, read_file  # a row that names a local file: read like one

        return read_file(ImageItem(value["path"], value["path"]), max_bytes, ReadResult(0, None))
