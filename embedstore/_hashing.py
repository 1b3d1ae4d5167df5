"""Hashes: BLAKE2b-128 of image bytes (change detection, identity) and SHA-256 of weights and payloads (lineage).

Crash safety: reads only.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

CHUNK = 1 << 20


def hash_bytes(data: bytes) -> str:
    """Content hash of an image's bytes, as stored in the images table (BLAKE2b, 128 bits, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str | os.PathLike) -> str:
    """:func:`hash_bytes` of a file, read in chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest (weights files, saved heads: the lineage checksums)."""
    return hashlib.sha256(data).hexdigest()


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    """:func:`sha256_bytes` of the concatenated ``chunks``, without joining them in memory."""
    h = hashlib.sha256()
    for block in chunks:
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """:func:`sha256_bytes` of a file, read in chunks."""
    with open(path, "rb") as f:
        return sha256_chunks(iter(lambda: f.read(CHUNK), b""))
