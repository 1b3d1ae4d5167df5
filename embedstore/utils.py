"""Small shared helpers: human-readable sizes, stage timing, the CPU cores free now (hashing: _hashing,
vectors: _vectors).

Crash safety: pure functions; nothing is written.
"""
from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from typing import Iterator

from .errors import SizeError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a human-readable size such as ``"4G"``, ``"512M"`` or ``1024`` into bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), flags=re.I)
    if not m:
        raise SizeError(f"cannot read size {text!r}: use a number with an optional K/M/G/T suffix, e.g. '4G'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """Format bytes as a short human-readable string (``1.5G``)."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


@contextmanager
def timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the enclosed block to ``stages[name]`` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def cpu_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_cores(most: int | None = 4) -> int:
    """CPU cores not busy right now (at least 1, at most ``most``; None: no cap): BLAS and OpenMP
    threads that spin on a loaded machine make scikit-learn's t-SNE and logistic regression many
    times slower than one thread."""
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return 1
    free = int((os.cpu_count() or 1) - busy)
    return max(1, free if most is None else min(most, free))
