"""The one way embedstore writes a file that must never be seen half-written.

Crash safety: the content goes to a temporary file beside the target (same folder, so the rename
cannot cross file systems), is flushed and fsync'd, then ``os.replace`` puts it in place and the
folder is fsync'd so the rename survives a power cut. A reader sees the old file or the new one,
never a mix; a killed writer leaves at most a ``.NAME.tmp-PID`` file, which is never read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames and unlinks done in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_beside(path: str | os.PathLike) -> Path:
    """The temporary name used for ``path`` by this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> int:
    """Call ``write(tmp_path)`` to produce the file, then publish it at ``path``; returns its size in bytes."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return size
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> int:
    """Publish ``data`` at ``path`` atomically; returns its size."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> int:
    """Publish ``text`` (UTF-8) at ``path`` atomically; returns its size."""
    return atomic_write_bytes(path, text.encode("utf-8"))
