"""A space as an Arrow table (``Space.to_arrow``) or a pandas DataFrame (``Space.to_pandas``).

Columns are the image columns asked (``path``, ``label``, ``split``, ``size``, ``hash``, ``mtime``) and
``vector``: a ``FixedSizeListArray`` of the stored dtype (float16 stays float16) whose buffer *is* the
numpy array read for those positions, wrapped without a copy and without a float32 conversion. A label or
split of none (``""`` in the store) is null. Memory is the positions asked: pass ``positions`` (an int,
slice, int array or boolean mask) to read a part of a large space.

Crash safety: read-only; nothing here writes a file.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import StoreError
from .format import CATEGORICAL, IMAGE_COLUMNS

TABLE_COLUMNS = ("path", "label", "split", "vector")
VECTOR = "vector"


def vector_array(vectors: np.ndarray) -> Any:
    """``(n, dim)`` vectors as a pyarrow ``FixedSizeListArray`` over the same memory (no copy, same dtype)."""
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors)  # a copy only if the rows are not contiguous already
    n, dim = vectors.shape
    values = pa.Array.from_buffers(pa.from_numpy_dtype(vectors.dtype), n * dim, [None, pa.py_buffer(vectors)])
    return pa.FixedSizeListArray.from_arrays(values, dim)


def string_array(values: np.ndarray, *, empty_is_null: bool) -> Any:
    """An object array of strings as a pyarrow string array; ``""`` becomes null when ``empty_is_null``."""
    import pyarrow as pa

    values = np.asarray(values, dtype=object)
    mask = (values == "") if empty_is_null and len(values) else None
    return pa.array(values, type=pa.string(), mask=mask)


def _check_columns(columns: Sequence[str]) -> list[str]:
    if isinstance(columns, str):
        columns = [columns]
    allowed = (*IMAGE_COLUMNS, VECTOR)
    bad = [c for c in columns if c not in allowed]
    if bad or not columns:
        raise StoreError(f"no column {', '.join(map(repr, bad)) or '(none given)'}: choose from {', '.join(allowed)}")
    return list(columns)


def space_table(space: Any, columns: Sequence[str] = TABLE_COLUMNS, positions: np.ndarray | None = None) -> Any:
    """``columns`` of ``space`` at ``positions`` (int64 positions in range; all when None) as a ``pyarrow.Table``."""
    import pyarrow as pa

    out: dict[str, Any] = {}
    for name in _check_columns(columns):
        if name == VECTOR:
            out[name] = vector_array(space.vectors[:] if positions is None else space.vectors[positions])
            continue
        values = space.column(name, positions)
        if name in CATEGORICAL or name in ("path", "hash"):
            out[name] = string_array(values, empty_is_null=name in CATEGORICAL)
        else:
            out[name] = pa.array(values)
    return pa.table(out)


def space_frame(space: Any, columns: Sequence[str] = TABLE_COLUMNS, positions: np.ndarray | None = None) -> Any:
    """:func:`space_table` as a pandas DataFrame (``vector``: one numpy array of the stored dtype per row)."""
    try:
        import pandas  # noqa: F401  (pyarrow's to_pandas needs it)
    except ImportError as e:
        raise StoreError("Space.to_pandas needs pandas, which is not installed: pip install 'tl-embedstore[pandas]' "
                         "(or pip install pandas; Space.to_arrow needs only pyarrow)") from e
    return space_table(space, columns, positions).to_pandas()
