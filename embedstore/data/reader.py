"""Reading images: read files safely and decode them robustly (discovery lives in ``collection``,
decoding in ``decode``: Pillow, or torchvision for the JPEGs it decodes faster to the same pixels).

The reader stage of the pipeline. Every failure is returned as data (error type and message),
never raised, so one bad file cannot stop a run. The reader opens only regular files, without
blocking (a FIFO swapped in cannot hang it), and reads at most ``max_bytes`` of each; an entry
that discovery refused (a symlink out of the root) is recorded as a failure. Items that are not
local files (tar members, URLs, dataset rows) are read by their byte source (``ImageItem.source``);
a batch's URLs are downloaded concurrently (``__getitems__``). Crash safety: this module only
reads; it writes nothing.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .._hashing import hash_bytes
from ..errors import EmptyFileError, FileTooLargeError, NotRegularFileError, OutsideRootError
from .items import MAX_FILE_BYTES, ByteSource, ImageItem
from .decode import MAX_PIXELS, Decoder, decode_image, to_rgb  # noqa: F401 (re-exported: serve, tests)


@dataclass
class ReadResult:
    """The reader's output for one item: pixels or an error, plus the file facts."""

    index: int
    pixels: torch.Tensor | None
    size: int = 0
    mtime: float = 0.0
    hash: str = ""
    error: str = ""
    message: str = ""


class ImageReader(torch.utils.data.Dataset):
    """Reads, hashes, decodes and transforms items; failures come back as results, not exceptions.

    ``decoder`` picks the decoding path (:class:`.decode.Decoder`): ``"auto"`` (torchvision for the
    JPEGs it decodes faster to the same pixels, Pillow for the rest), ``"pillow"`` (the reference
    path for every file) or ``"torchvision"`` (every JPEG it can take, large ones too).
    """

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[Image.Image], Any], min_size: int | None,
                 max_bytes: int = MAX_FILE_BYTES, decoder: str = "auto"):
        self.items = items
        self.transform = transform
        self.min_size = min_size
        self.max_bytes = max_bytes
        self.decode = Decoder(transform, min_size, decoder)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ReadResult:
        return self._result(index, None)

    def __getitems__(self, indices: Sequence[int]) -> list[ReadResult]:
        """A batch (torch's DataLoader fetcher calls this): the items of one byte source that reads
        several at once (URLs: concurrent downloads; dataset rows) are read together first."""
        groups: dict[int, tuple[ByteSource, list[int]]] = {}
        for i in indices:
            source = self.items[i].source
            if source is not None and not self.items[i].refusal:
                groups.setdefault(id(source), (source, []))[1].append(i)
        read: dict[int, bytes | Exception] = {}
        for source, idx in groups.values():
            if len(idx) > 1:
                read.update(zip(idx, source.read_many([self.items[i] for i in idx], self.max_bytes)))
        return [self._result(i, read.get(i)) for i in indices]

    def _result(self, index: int, got: bytes | Exception | None) -> ReadResult:
        item = self.items[index]
        result = ReadResult(index, None)
        try:
            data = read_item(item, self.max_bytes, result, got)
            result.hash = hash_bytes(data)
            if not data:
                raise EmptyFileError("empty file (0 bytes): nothing to decode")
            result.pixels = self.decode(data)
        except Exception as e:  # noqa: BLE001 - a bad file is data, not a crash
            result.error, result.message = type(e).__name__, str(e)[:500] or type(e).__name__
        return result


def read_item(item: ImageItem, max_bytes: int, result: ReadResult, got: bytes | Exception | None = None) -> bytes:
    """The bytes of any item: a local file (:func:`read_file`), or what its byte source reads (``got``:
    already read by ``read_many``); ``result`` gets the size and mtime recorded for it."""
    if item.source is None:
        return read_file(item, max_bytes, result)
    result.size, result.mtime = item.stat or (0, 0.0)
    data = item.source.read(item, max_bytes) if got is None else got
    if isinstance(data, Exception):
        raise data
    if item.stat is None:
        result.size = len(data)
    return data


def read_file(item: ImageItem, max_bytes: int, result: ReadResult) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; ``result`` gets its size and mtime.

    Refusals raise before any byte is read: a discovery refusal, anything but a regular file
    (FIFO, device, socket, folder), a file over the limit. The open never blocks (O_NONBLOCK)
    and the opened descriptor is checked again, so a FIFO swapped in meanwhile is refused too.
    """
    st = os.stat(item.path)
    result.size, result.mtime = st.st_size, st.st_mtime
    if item.refusal:
        raise OutsideRootError(item.refusal)
    _check_file(st, max_bytes)
    fd = os.open(item.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        result.size, result.mtime = st.st_size, st.st_mtime
        _check_file(st, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(f"grew past the limit of {max_bytes} bytes while being read")
    return data


def _check_file(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for k, test in (("a FIFO", stat.S_ISFIFO), ("a character device", stat.S_ISCHR),
                                        ("a block device", stat.S_ISBLK), ("a socket", stat.S_ISSOCK),
                                        ("a folder", stat.S_ISDIR)) if test(st.st_mode)), "not a regular file")
        raise NotRegularFileError(f"refused: {kind}, not a regular file (only image files are read)")
    if st.st_size > max_bytes:
        raise FileTooLargeError(f"refused: {st.st_size} bytes exceeds the limit of {max_bytes} bytes "
                                "(raise it with --max-file-size / max_bytes)")


def collate(results: list[ReadResult]) -> tuple[list[ReadResult], torch.Tensor | None]:
    """Batch the decodable results into one uint8 tensor; failed ones ride along without pixels."""
    good = [r.pixels for r in results if r.pixels is not None]
    batch = torch.stack(good) if good else None
    for r in results:
        r.pixels = None
    return results, batch


def draft_size(data_config: dict[str, Any]) -> int:
    """Smallest side the eval transform resizes to (decoding below it would lose detail)."""
    side = int(data_config["input_size"][-1])
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    return int(np.ceil(side / crop_pct))
