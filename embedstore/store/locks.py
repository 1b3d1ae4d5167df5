"""Exclusive, non-blocking file locks for the one writer of a store or an index.

Crash safety: the lock is a kernel lock (``flock`` through the ``filelock`` package) on
``NAME.lock``; the kernel drops it when its process dies, however it dies, so a lock file left
behind by a killed writer never blocks the next run. The file's text ("pid N") is informative
only: it names the holder in the "being written by" message and is never trusted for locking.
"""
from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout


class HeldLock:
    """An acquired lock; ``release()`` (idempotent) lets the next writer in."""

    def __init__(self, lock: FileLock) -> None:
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None


def try_lock(path: str | os.PathLike) -> HeldLock | str:
    """Take the lock on ``path`` without waiting.

    Returns the held lock, or, when another process (or another writer in this process) holds
    it, a description of the holder ("pid N", else "another process").
    """
    path = Path(path)
    # thread_local=False and is_singleton=False: every writer object is a separate claim, so a
    # second writer of the same store in this very process is refused like one in another process
    lock = FileLock(str(path), timeout=0, thread_local=False, is_singleton=False, fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            owner = path.read_text(errors="replace").strip()
        except OSError:
            owner = ""
        return owner or "another process"
    try:
        with open(path, "r+") as fh:  # the holder's name, for the message of the next one refused
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
    except OSError:
        pass
    return HeldLock(lock)
