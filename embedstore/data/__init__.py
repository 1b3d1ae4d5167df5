"""Image collections in: discover a folder or CSV list, read and decode each file safely.

Discovery is plain Python; the reader (a torch Dataset) imports torch when first used.
Crash safety: this stage only reads; it writes nothing.
"""
from __future__ import annotations

from .._lazy import lazy_exports
from .collection import MAX_FILE_BYTES, ImageItem, discover, image_extensions

_READER = ("ImageReader", "ReadResult", "collate", "decode_image", "to_rgb", "draft_size", "read_file")
__getattr__, __dir__ = lazy_exports(__name__, {name: ".reader" for name in _READER})

__all__ = ["MAX_FILE_BYTES", "ImageItem", "discover", "image_extensions", *_READER]
