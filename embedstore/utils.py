"""Small shared helpers: human-readable sizes, hashing, timing."""
from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a human-readable size such as ``"4G"``, ``"512M"`` or ``1024`` into bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), flags=re.I)
    if not m:
        raise ValueError(f"cannot read size {text!r}: use a number with an optional K/M/G/T suffix, e.g. '4G'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """Format bytes as a short human-readable string (``1.5G``)."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def hash_bytes(data: bytes) -> str:
    """Content hash used to detect changed files (BLAKE2b, 128 bits, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the enclosed block to ``stages[name]`` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def median_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Median cosine similarity between matching rows of two matrices."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.median((a * b).sum(1)))
