"""The record every audit section lists per image: ``{"path", "row", "label", "split"}`` of space positions.

Crash safety: reads the path, label and split columns at the positions given; writes nothing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..store import Space


def image_records(sp: Space, positions: np.ndarray) -> list[dict[str, Any]]:
    """Path, store row, label and split of each position (those columns read for these positions only)."""
    positions = np.asarray(positions, dtype=np.int64)
    paths, labels, splits = (sp.column(c, positions) for c in ("path", "label", "split"))
    return [{"path": str(p), "row": int(r), "label": str(lab), "split": str(s)}
            for p, r, lab, s in zip(paths, sp.rows[positions], labels, splits)]
