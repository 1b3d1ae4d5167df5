"""The HDF5 store: file layout, the journaled crash-safe writer, validated reading, locks."""
from __future__ import annotations

from .store import Space, Store, open_store, StoreWriter, Batch, write_file, journal_dir, lock_path, list_parts, check_space_compatible, failure_keys, FAILURE_COLUMNS, IMAGE_COLUMNS, FORMAT
from .integrity import validate_space_name

__all__ = ['Space', 'Store', 'open_store', 'StoreWriter', 'Batch', 'write_file', 'journal_dir', 'lock_path', 'list_parts', 'check_space_compatible', 'failure_keys', 'FAILURE_COLUMNS', 'IMAGE_COLUMNS', 'FORMAT', 'validate_space_name']
