"""Merging: fold finished shard files into a store as if they were journal parts of a local run.

Crash safety: each shard file is adopted as a journal part of the target (an atomic, durable
rename or copy done by :class:`embedstore.store.StoreWriter`), then the journal is folded in; a
merge killed half-way is completed by the next writer of the store, and applying a shard twice
changes nothing. Sources are deleted only after the fold; the target itself, its journal, its lock
or a repeated file are refused before anything is changed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import MissingShardFileError, ShardError, StoreError
from ..store import StoreWriter, journal_dir, lock_path
from .plan import plan_view
from .shards import file_spaces, published_shards, shards_dir, unfinished_shards


def merge(store: str | os.PathLike, sources: Sequence[str | os.PathLike] | None = None, *,
          expect: int | None = None, remove: bool = True) -> dict[str, Any]:
    """Fold shard files into ``store`` (created if absent) as if they were journal parts.

    Args:
        store: the target ``.h5`` store.
        sources: shard (or store) files, applied in this order; default: the published shard
            files of ``store`` in shard order.
        expect: require all N shards ``shard-*-of-N`` before merging anything.
        remove: delete the merged shard files afterwards.
    Returns a summary: merged files, images before/after, rows per space.
    """
    store = Path(store)
    t0 = time.perf_counter()
    if sources is None:
        found = published_shards(store)
        if expect is not None:
            have = {i for i, n, _ in found if n == expect}
            missing = [i for i in range(expect) if i not in have]
            if missing:
                shown = ", ".join(f"{i}/{expect}" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
                raise StoreError(
                    f"{len(missing)} of {expect} shards of {store} are not finished ({shown}): run "
                    f"`embedstore embed PATH --store {store} --shard I/{expect}` for each, then merge again"
                )
        paths = [p for _, _, p in found]
    else:
        if expect is not None:
            raise ShardError(f"expect={expect} checks the published shards of {store}; do not combine it with "
                             "explicit files (leave out --expect or the FILES)")
        paths = [Path(s) for s in sources]
        for p in paths:
            if not p.is_file():
                raise MissingShardFileError(f"no shard file at {p}: list published shards with `ls {shards_dir(store)}`")
        _refuse_unsafe_sources(store, paths)
    before = plan_view(store)
    roots = {r for r in [before.root if before else ""] + [file_spaces(p)[0] for p in paths] if r}
    if len(roots) > 1:
        raise StoreError(
            f"cannot merge into {store}: its files have different collection roots ({', '.join(sorted(roots))}); "
            "run every shard on the same PATH and --store"
        )
    with StoreWriter(store, root=next(iter(roots), None)) as writer:
        for p in paths:
            writer.adopt(p)
        writer.consolidate()
    if remove:
        for p in paths:
            p.unlink(missing_ok=True)
        try:
            shards_dir(store).rmdir()
        except OSError:
            pass
    after = plan_view(store)  # counts only: the header and rows, not the vectors just written
    return {
        "store": str(store),
        "merged": len(paths),
        "files": [str(p) for p in paths],
        "images_before": before.n_images if before else 0,
        "images": after.n_images if after else 0,
        "rows": {name: len(sp) for name, sp in after.spaces.items()} if after else {},
        "failures": len(after.failures) if after else 0,
        "unfinished": [f"{i}/{n}" for i, n in unfinished_shards(store)],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _refuse_unsafe_sources(store: Path, paths: Sequence[Path]) -> None:
    """Refuse sources that are the target itself (any spelling, symlink), its journal or lock, or repeated.

    Merged sources are deleted afterwards: merging a store into itself would delete the store.
    """
    target = os.path.realpath(store)
    own = {target, os.path.realpath(lock_path(store))}
    journal = os.path.realpath(journal_dir(store))
    seen: dict[str, Path] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in own or real == journal or real.startswith(journal + os.sep):
            raise StoreError(f"cannot merge {p} into {store}: it is {store} itself or part of it; "
                             "list shard files (other stores) only; nothing was changed")
        if real in seen:
            raise StoreError(f"{p} is listed twice (also as {seen[real]}): list each shard file once; "
                             "nothing was changed")
        seen[real] = p
