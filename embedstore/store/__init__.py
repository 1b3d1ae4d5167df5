"""The HDF5 store: file layout, the journaled crash-safe writer, validated reading, locks.

Crash safety: files are only ever published whole (temporary file, fsync, rename) by one lock holder;
readers see the old or the new content, and a killed writer leaves only whole journal parts (see writer).
"""
from __future__ import annotations

from .format import FAILURE_COLUMNS, FORMAT, IMAGE_COLUMNS, journal_dir, list_parts, lock_path, write_file
from .integrity import check_space_compatible, validate_space_name
from .keys import path_keys
from .reader import Space, Store, VectorArray, failure_keys, open_store
from .writer import Batch, StoreWriter

__all__ = ['Space', 'Store', 'VectorArray', 'path_keys', 'open_store', 'StoreWriter', 'Batch', 'write_file', 'journal_dir', 'lock_path', 'list_parts', 'check_space_compatible', 'failure_keys', 'FAILURE_COLUMNS', 'IMAGE_COLUMNS', 'FORMAT', 'validate_space_name']
