"""Deterministic shards of a collection and their files: which shard an image is in, where it is written.

A collection is split into ``n`` shards by a stable hash of each image's relative path, so a
file's shard never changes when other files are added or removed. Shard ``i`` of ``n`` of the
store ``FILE.h5`` is embedded into its own store file, in two steps::

    FILE.h5.shards/partial-00003-of-00016.h5   work in progress (a resumable store: journal, lock)
    FILE.h5.shards/shard-00003-of-00016.h5     published by an atomic rename once complete

Crash safety: a shard is finished exactly when its ``shard-*`` file exists; it appears by one
``os.replace`` of the complete work file (or an atomically written empty store), followed by an
fsync of the folder. A killed shard job leaves its ``partial-*`` store, which the next run resumes.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py

from .._atomic import fsync_dir
from ..choices import MAX_SHARDS
from ..data.collection import ImageItem
from ..errors import ShardError, StoreError
from ..store import FAILURE_COLUMNS, IMAGE_COLUMNS, Store, lock_path, write_file
from .plan import plan_view, rebase_onto
from .summary import RunSummary

_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.h5$")
_PARTIAL_RE = re.compile(r"^partial-(\d{5})-of-(\d{5})\.h5$")


def shard_of(rel: str, n: int) -> int:
    """The shard (0..n-1) of an image, from a stable hash of its relative path.

    BLAKE2b-64 of the path, not :mod:`embedstore._hashing`'s content hash: it is a placement rule,
    and changing it would move every image of a half-done sharded run to another shard."""
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """``(i, n)``, checked: N in 1..99999 and I in 0..N-1."""
    if isinstance(shard, (str, bytes)) or not hasattr(shard, "__len__") or len(shard) != 2:
        raise ShardError(f"shard must be a pair (i, n), not {shard!r}: e.g. shard=(3, 16) "
                         "(parse a string \"3/16\" with embedstore.pipeline.parse_shard)")
    i, n = int(shard[0]), int(shard[1])
    if not 1 <= n <= MAX_SHARDS or not 0 <= i < n:
        raise ShardError(f"shard {i}/{n} is out of range: N must be 1..{MAX_SHARDS} and I one of 0..N-1")
    return i, n


def parse_shard(shard: tuple[int, int] | str) -> tuple[int, int]:
    """``"3/16"`` (as given to ``--shard``) or ``(3, 16)`` -> ``(3, 16)``, checked."""
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise ShardError(f"cannot read shard {shard!r}: write it as I/N, e.g. --shard 3/16 (I counts from 0)")
        shard = int(m.group(1)), int(m.group(2))
    return check_shard(shard)


def select_shard(items: Sequence[ImageItem], i: int, n: int) -> list[ImageItem]:
    """The items of shard i of n (order kept)."""
    return [it for it in items if shard_of(it.rel, n) == i]


def shards_dir(store: str | os.PathLike) -> Path:
    """The folder of ``store``'s shard files: ``FILE.h5.shards``."""
    return Path(str(store) + ".shards")


def shard_file(store: str | os.PathLike, i: int, n: int) -> Path:
    """Where shard i of n of ``store`` is published when complete."""
    return shards_dir(store) / f"shard-{i:05d}-of-{n:05d}.h5"


def work_file(store: str | os.PathLike, i: int, n: int) -> Path:
    """Where shard i of n of ``store`` is written while in progress (a resumable store)."""
    return shards_dir(store) / f"partial-{i:05d}-of-{n:05d}.h5"


def published_shards(store: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """Finished, not yet merged shard files of ``store``: (i, n, path), in shard order."""
    folder = shards_dir(store)
    if not folder.is_dir():
        return []
    found = []
    for name in os.listdir(folder):
        m = _SHARD_RE.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), folder / name))
    return sorted(found, key=lambda t: (t[1], t[0]))


def unfinished_shards(store: str | os.PathLike) -> list[tuple[int, int]]:
    """Shards with work in progress (a killed or running shard job)."""
    folder = shards_dir(store)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), int(m.group(2))) for m in map(_PARTIAL_RE.match, os.listdir(folder)) if m)


def file_spaces(path: Path) -> tuple[str, list[str]]:
    """(root, space names) of a store file, from its header only."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return str(f.attrs.get("root", "")), list(f["spaces"])
    except (OSError, KeyError) as e:
        raise StoreError(f"{path} is not a readable shard or store file ({e}): delete it and run that shard again") from e


@dataclass
class ShardJob:
    """One shard's work: its items (relative to ``root``), its files, and the target's contents."""

    store: Path
    index: int
    count: int
    root: str
    items: list[ImageItem]
    base: Store | None
    space: str
    done: bool = False

    @property
    def work(self) -> Path:
        return work_file(self.store, self.index, self.count)

    @property
    def final(self) -> Path:
        return shard_file(self.store, self.index, self.count)

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def publish(self) -> Path:
        """Rename the completed work file to the shard file (an empty store if nothing was new)."""
        if self.work.exists():
            os.replace(self.work, self.final)
        else:
            write_file(self.final, attrs={"root": self.root, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                       images={c: [] for c in IMAGE_COLUMNS}, spaces={}, failures={c: [] for c in FAILURE_COLUMNS})
        fsync_dir(self.final.parent)
        lock_path(self.work).unlink(missing_ok=True)
        return self.final

    def skipped_summary(self, backbone: str) -> RunSummary:
        """What ``embed`` returns for a shard that was already finished."""
        return RunSummary(str(self.store), self.space, backbone, None, "", "", len(self.items),
                          skipped_extra=len(self.items),
                          extra={"shard": self.label, "shard_file": str(self.final), "shard_skipped": True})


def prepare_shard(store: str | os.PathLike, root: str, items: Sequence[ImageItem],
                  shard: tuple[int, int], space: str) -> ShardJob:
    """Select a shard's items and check whether it is finished already.

    Paths are expressed relative to the target store's root when it exists (as a local run
    would), so shard files merge into it; the target is read (without vectors) to skip images it
    already holds.
    """
    i, n = check_shard(shard)
    store = Path(store).absolute()
    base = plan_view(store)
    root, items = rebase_onto(base, root, items)
    job = ShardJob(store, i, n, root, select_shard(items, i, n), base, space)
    if job.final.exists():
        _, spaces = file_spaces(job.final)
        if spaces and space not in spaces:
            raise StoreError(
                f"{job.final} is a finished shard of space {spaces[0]!r}, not {space!r}: "
                f"run `embedstore merge {store}` to fold finished shards in first"
            )
        job.done = True
    else:
        job.final.parent.mkdir(parents=True, exist_ok=True)
    return job
