"""Image collections in: discover a folder, tar shards, a CSV/Parquet table (paths or URLs) or a Hugging
Face dataset, then read and decode each image safely.

Discovery is plain Python; the reader (a torch Dataset) and the decoders import torch when first used.
Crash safety: this stage only reads; it writes nothing.
"""
from __future__ import annotations

from .._lazy import lazy_exports
from .collection import MAX_FILE_BYTES, ByteSource, ImageItem, discover, image_extensions
from .remote import Fetch

_READER = ("ImageReader", "ReadResult", "collate", "draft_size", "read_file", "read_item")
_DECODE = ("Decoder", "decode_image", "to_rgb")
__getattr__, __dir__ = lazy_exports(__name__, {**{name: ".reader" for name in _READER},
                                               **{name: ".decode" for name in _DECODE}})

__all__ = ["MAX_FILE_BYTES", "ByteSource", "Fetch", "ImageItem", "discover", "image_extensions", *_READER, *_DECODE]
