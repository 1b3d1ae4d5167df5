"""Scale-out: deterministic shards, shard files, merging, a Ray runner, and an IVF index recipe.

A collection is split into ``n`` shards by a stable hash of each image's relative path, so a
file's shard never changes when other files are added or removed. Shard ``i`` of ``n`` of the
store ``FILE.h5`` is embedded by the ordinary :func:`embedstore.pipeline.embed` into its own
store file, in two steps::

    FILE.h5.shards/partial-00003-of-00016.h5   work in progress (a resumable store: journal, lock)
    FILE.h5.shards/shard-00003-of-00016.h5     published by an atomic rename once complete

A published shard is finished: a rerun skips it. :func:`merge` adopts published shard files as
journal parts of ``FILE.h5`` (in shard order) and folds them in, so the result has exactly the
schema of a local run, and a merge killed half-way is completed by the next writer.

Any scheduler can run shards (``embedstore embed PATH --store FILE.h5 --shard I/N`` in a Slurm
array or Kubernetes job, then ``embedstore merge FILE.h5``); :func:`embed_ray` does it on a Ray
cluster with one backbone per worker actor and Ray's actor restarts and task retries for
workers that die. Images and stores must sit on a file system that every worker sees.

:func:`build_ivf_on_disk` is the index recipe for collections that do not fit one machine's
memory: train an IVF index on a sample, add each shard file independently, merge the inverted
lists into one on-disk file (``faiss.contrib.ondisk.merge_ondisk``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from .. import DEFAULT_BACKBONE
from ..backbones.registry import default_space_name
from ..data.collection import ImageItem, discover
from ..errors import StoreError
from ..store.integrity import check_rows
from ..store.store import (
    FAILURE_COLUMNS,
    IMAGE_COLUMNS,
    Space,
    Store,
    StoreWriter,
    _decode_attrs,
    _fsync_dir,
    _read_columns,
    journal_dir,
    lock_path,
    open_store,
    validate_space_name,
    write_file,
)

_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.h5$")
_PARTIAL_RE = re.compile(r"^partial-(\d{5})-of-(\d{5})\.h5$")
KILL_ENV = "EMBEDSTORE_TEST_KILL_SHARD"  # test only: "I:FLAGFILE[:PARTS]", see ShardWorker._arm_kill


# --------------------------------------------------------------------------- shards


def shard_of(rel: str, n: int) -> int:
    """The shard (0..n-1) of an image, from a stable hash of its relative path."""
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def parse_shard(shard: tuple[int, int] | str) -> tuple[int, int]:
    """``"3/16"`` or ``(3, 16)`` -> ``(3, 16)``, checked."""
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise ValueError(f"cannot read shard {shard!r}: write it as I/N, e.g. --shard 3/16 (I counts from 0)")
        shard = int(m.group(1)), int(m.group(2))
    i, n = int(shard[0]), int(shard[1])
    if not 1 <= n <= 99999 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is out of range: N must be 1..99999 and I one of 0..N-1")
    return i, n


def select_shard(items: Sequence[ImageItem], i: int, n: int) -> list[ImageItem]:
    """The items of shard i of n (order kept)."""
    return [it for it in items if shard_of(it.rel, n) == i]


def shards_dir(store: str | os.PathLike) -> Path:
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


def _file_spaces(path: Path) -> tuple[str, list[str]]:
    """(root, space names) of a store file, from its header only."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return str(f.attrs.get("root", "")), list(f["spaces"])
    except (OSError, KeyError) as e:
        raise StoreError(f"{path} is not a readable shard or store file ({e}): delete it and run that shard again") from e


def plan_view(path: Path) -> Store | None:
    """The main file of a store without its vectors: enough to plan what a shard still needs.

    Journal parts of a killed local run are not read; their images are embedded again, which
    the merge resolves (the later vector of a row wins), so nothing is lost or duplicated.
    """
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = _decode_attrs(f.attrs)
            images = _read_columns(f["images"], IMAGE_COLUMNS)
            fail = _read_columns(f["failures"], FAILURE_COLUMNS)
            spaces = {}
            for name, g in f["spaces"].items():
                rows = g["rows"][()]
                check_rows(path, f"spaces/{name}", rows, len(images["path"]))
                spaces[name] = Space(name, _decode_attrs(g.attrs), rows, np.empty((len(rows), 0), np.float16),
                                     images["path"][rows], images["label"][rows], images["split"][rows])
    except (OSError, KeyError, ValueError) as e:
        raise StoreError(f"{path} is not a readable embedstore file ({e}): move it aside or restore it") from e
    failures = [{c: fail[c][j] for c in FAILURE_COLUMNS} for j in range(len(fail["path"]))]
    return Store(path, str(attrs.get("root", "")), images, failures, spaces)


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

    def publish(self) -> Path:
        """Rename the completed work file to the shard file (an empty store if nothing was new)."""
        if self.work.exists():
            os.replace(self.work, self.final)
        else:
            write_file(self.final, attrs={"root": self.root, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                       images={c: [] for c in IMAGE_COLUMNS}, spaces={}, failures={c: [] for c in FAILURE_COLUMNS})
        _fsync_dir(self.final.parent)
        Path(str(self.work) + ".lock").unlink(missing_ok=True)
        return self.final

    def skipped_summary(self, backbone: str) -> dict[str, Any]:
        """What ``embed`` returns for a shard that was already finished."""
        return {
            "store": str(self.store), "space": self.space, "backbone": backbone, "weights": None, "device": "",
            "precision": "", "images": len(self.items), "embedded": 0, "skipped": len(self.items), "unchanged": 0,
            "failed": 0, "known_failures": 0, "seconds": 0.0, "images_per_s": 0.0, "stages": {},
            "shard": f"{self.index}/{self.count}", "shard_file": str(self.final), "shard_skipped": True,
        }


def prepare_shard(store: str | os.PathLike, root: str, items: Sequence[ImageItem],
                  shard: tuple[int, int] | str, space: str) -> ShardJob:
    """Select a shard's items and check whether it is finished already.

    Paths are expressed relative to the target store's root when it exists (as a local run
    would), so shard files merge into it; the target is read (without vectors) to skip images it
    already holds.
    """
    from .run import _rebase

    i, n = parse_shard(shard)
    store = Path(store).absolute()
    base = plan_view(store)
    if base is not None and base.root and base.root != root:
        items = [_rebase(it, base.root) for it in items]
        root = base.root
    job = ShardJob(store, i, n, root, select_shard(items, i, n), base, space)
    if job.final.exists():
        _, spaces = _file_spaces(job.final)
        if spaces and space not in spaces:
            raise StoreError(
                f"{job.final} is a finished shard of space {spaces[0]!r}, not {space!r}: "
                f"run `embedstore merge {store}` to fold finished shards in first"
            )
        job.done = True
    else:
        job.final.parent.mkdir(parents=True, exist_ok=True)
    return job


# --------------------------------------------------------------------------- merging


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
            raise ValueError("expect checks the published shards of the store; do not combine it with explicit files")
        paths = [Path(s) for s in sources]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"no shard file at {p}: list published shards with `ls {shards_dir(store)}`")
        _refuse_unsafe_sources(store, paths)
    before = plan_view(store)
    roots = {r for r in [before.root if before else ""] + [_file_spaces(p)[0] for p in paths] if r}
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
    after = open_store(store) if paths or store.exists() else None
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


# --------------------------------------------------------------------------- Ray runner


class ShardWorker:
    """A Ray actor: one backbone (one per GPU or CPU worker), loaded once, embeds shard after shard."""

    def __init__(self, backbone: str, weights: str | None, kill: str | None = None) -> None:
        self.backbone_name, self.weights, self.kill = backbone, weights, kill
        self.bb: Any = None  # the loaded Backbone
        self.first_run = True  # a restarted actor reports its restart with its first shard only

    def run(self, source: str, store: str, i: int, n: int, root: str, items: list[ImageItem],
            options: dict[str, Any]) -> dict[str, Any]:
        import ray

        from .run import embed

        if self.bb is None:
            from ..backbones.load import load_backbone  # torch and timm, in the worker only

            self.bb = load_backbone(self.backbone_name, self.weights)
        stop = self._arm_kill(store, i, n)
        try:
            out = embed(source, store, shard=(i, n), discovered=(root, items), preloaded=self.bb,
                        backbone=self.backbone_name, weights=self.weights, progress=False, **options)
        finally:
            stop.set()
        with warnings.catch_warnings():  # deprecated in Ray 2.x, still the only restart flag
            warnings.simplefilter("ignore")
            out["restarted"] = self.first_run and bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.first_run = False
        out["node"] = os.uname().nodename
        return out

    def _arm_kill(self, store: str, i: int, n: int) -> threading.Event:
        """Test only: on the first attempt of shard I, die (``os._exit``) once PARTS parts are published.

        Returns the event that disarms it (set when the shard returns)."""
        stop = threading.Event()
        if not self.kill:
            return stop
        index, flag, *rest = self.kill.split(":")
        parts = int(rest[0]) if rest else 1
        if int(index) != i or os.path.exists(flag):
            return stop
        Path(flag).write_text("armed")
        journal = Path(str(work_file(store, i, n)) + ".journal")

        def watch() -> None:
            while not stop.is_set():
                published = len(list(journal.glob("part-*.h5"))) if journal.is_dir() else 0
                if published >= parts:
                    Path(flag).write_text(f"killed after {published} parts")
                    os._exit(1)
                time.sleep(0.002)

        threading.Thread(target=watch, daemon=True).start()
        return stop


def _connect(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, OSError, ValueError, RuntimeError) as e:
        raise RuntimeError(
            f"cannot reach a Ray cluster at {address!r} ({type(e).__name__}: {e}): start one with `ray start --head` "
            "on the head node, or leave out --address to run a local Ray here"
        ) from None
    return True


def embed_ray(
    source: str | os.PathLike,
    store: str | os.PathLike,
    *,
    address: str | None = None,
    shards: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    max_retries: int = 3,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    space: str | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Embed a collection on a Ray cluster: shards on worker actors, then merged into ``store``.

    Args:
        address: ``None`` (the running Ray instance, else a new local one), ``"auto"`` (the
            cluster this node belongs to) or ``"ray://HOST:PORT"`` (Ray Client).
        shards: number of shards (default: 4 per worker). Keep it fixed across reruns: finished
            shards of this count are skipped, those of another count are merged in first.
        gpus_per_worker: GPUs per worker actor (default: 1 when the cluster has GPUs, else 0).
        cpus_per_worker: CPUs per worker actor (default: 1 with GPUs, else 2); Ray gives the
            actor as many torch threads.
        max_retries: restarts of a dead worker and retries of its shard.
        options: the other :func:`embedstore.pipeline.embed` options (batch_size, device, ...).
    A dead worker's shard resumes from its last published journal part; the merge applies each
    shard once, so no row is lost or duplicated.
    """
    try:
        import ray
    except ImportError:
        raise RuntimeError('--engine ray needs Ray: pip install -e ".[ray]" in a checkout, or pip install ray (or --engine local)') from None
    from tqdm import tqdm

    if shards is not None and not 1 <= shards <= 99999:
        raise ValueError(f"shards must be 1..99999, not {shards}")
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    store = Path(store).absolute()
    space = validate_space_name(space or default_space_name(backbone, weights))
    root, items = discover(source)
    stages["discover"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    started = _connect(address)
    resources = ray.cluster_resources()
    if gpus_per_worker is None:
        gpus = 1.0 if resources.get("GPU", 0.0) >= 1 else 0.0
    else:
        gpus = float(gpus_per_worker)
    if gpus > 0:
        if resources.get("GPU", 0.0) < gpus:
            raise RuntimeError(f"the Ray cluster has {resources.get('GPU', 0):g} GPUs, fewer than "
                               f"--gpus-per-worker {gpus:g}: lower it, or 0 for CPU workers")
        cpus = cpus_per_worker or 1.0
        n_workers = int(resources.get("GPU", 0.0) // gpus)
    else:
        cpus = cpus_per_worker or min(2.0, resources.get("CPU", 1.0))
        n_workers = max(1, int(resources.get("CPU", 1.0) // cpus))
    n = shards or 4 * n_workers
    stale = [p for _, m, p in published_shards(store) if m != n]
    if stale:  # finished shards of an earlier run with another shard count
        merge(store, stale)
    base = plan_view(store)
    if base is not None and base.root and base.root != root:
        from .run import _rebase

        items = [_rebase(it, base.root) for it in items]
        root = base.root
    by_shard: dict[int, list[ImageItem]] = {i: [] for i in range(n)}
    for it in items:
        by_shard[shard_of(it.rel, n)].append(it)
    pending = [i for i in range(n) if not shard_file(store, i, n).exists()]
    n_workers = max(1, min(n_workers, len(pending)))
    actor_cls = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=max_retries,
                                                max_task_retries=max_retries)
    kill = os.environ.get(KILL_ENV)
    actors = [actor_cls.remote(backbone, weights, kill) for _ in range(n_workers)] if pending else []
    stages["schedule"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    queue = list(pending)
    inflight: dict[Any, tuple[Any, int]] = {}
    opts = {k: v for k, v in options.items() if v is not None}
    opts["space"] = space

    def submit(actor: Any) -> None:
        i = queue.pop(0)
        ref = actor.run.remote(str(source), str(store), i, n, root, by_shard[i], opts)
        inflight[ref] = (actor, i)

    bar = tqdm(total=len(pending), unit="shard", desc=f"embed {space} on Ray", disable=not progress, file=sys.stderr)
    try:
        for actor in actors:
            if queue:
                submit(actor)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor, i = inflight.pop(done[0])
            try:
                results.append(ray.get(done[0]))
            except ray.exceptions.RayActorError as e:  # died more than max_retries times
                errors.append(f"shard {i}/{n}: worker died ({type(e).__name__})")
                actors.remove(actor)
                if not actors and queue:
                    errors.append(f"{len(queue)} shards not started: no worker left")
                    queue.clear()
                continue
            except ray.exceptions.RayTaskError as e:  # an error of the shard itself: stop
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise RuntimeError(f"shard {i}/{n} of {store} failed: {type(cause).__name__}: {cause}") from None
            bar.update(1)
            if queue:
                submit(actor)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    stages["embed"] = time.perf_counter() - t0
    if errors:
        raise RuntimeError(
            f"{len(errors)} shard(s) of {store} failed after {max_retries} retries: {'; '.join(errors[:5])}. "
            "Finished shards are kept; run the same command again to do the rest"
        )
    t0 = time.perf_counter()
    merged = merge(store, [p for _, m, p in published_shards(store) if m == n])
    stages["merge"] = time.perf_counter() - t0
    ran = [r for r in results if not r["shard_skipped"]]
    embedded = sum(r["embedded"] for r in ran)
    failed = sum(r["failed"] for r in ran)
    seconds = time.perf_counter() - t_start
    return {
        "store": str(store),
        "space": space,
        "backbone": backbone,
        "weights": next((r["weights"] for r in ran), None),
        "device": next((r["device"] for r in ran), ""),
        "precision": next((r["precision"] for r in ran), ""),
        "engine": "ray",
        "images": len(items),
        "embedded": embedded,
        "skipped": sum(r["skipped"] for r in ran) + sum(len(by_shard[i]) for i in range(n) if i not in pending),
        "unchanged": sum(r["unchanged"] for r in ran),
        "failed": failed,
        "known_failures": sum(r["known_failures"] for r in ran),
        "seconds": round(seconds, 3),
        "images_per_s": round((embedded + failed) / stages["embed"], 2) if stages["embed"] > 0 and ran else 0.0,
        "stages": {k: round(v, 3) for k, v in stages.items()},
        "shards": n,
        "shards_run": len(results),
        "shards_skipped": n - len(pending),
        "workers": n_workers if pending else 0,
        "gpus_per_worker": gpus,
        "cpus_per_worker": cpus,
        "worker_restarts": sum(bool(r.get("restarted")) for r in results),
        "merged_files": merged["merged"],
        "per_shard": [{k: r.get(k) for k in ("shard", "embedded", "failed", "seconds", "images_per_s", "restarted",
                                             "node")} for r in results],
    }


# --------------------------------------------------------------------------- index recipe


def _space_of(path: Path, space: str | None) -> str:
    _, names = _file_spaces(path)
    if space is None:
        if not names:
            return ""
        return names[0]
    return space if space in names else ""


def build_ivf_on_disk(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    space: str | None = None,
    nlist: int | None = None,
    factory: str | None = None,
    train_size: int | None = None,
    chunk: int = 65536,
    seed: int = 0,
) -> dict[str, Any]:
    """Recipe: one IVF index over many store/shard files, never holding all vectors in memory.

    1. train ``IVF{nlist},Flat`` (or ``factory``, any IVF, e.g. ``IVF65536,PQ64``) on a random
       sample drawn from every file (cosine: L2-normalised float32, inner product);
    2. for each file independently (in parallel on other machines if you like): load the trained
       index, ``add_with_ids`` the file's vectors in chunks, write ``block-KKKKK.index``;
    3. ``merge_ondisk`` the blocks' inverted lists into ``merged.ivfdata`` (mmap; only the
       coarse quantizer stays in RAM) and write ``populated.index`` beside it.

    Ids are global: ``offset[file] + row``, where ``row`` is the row of the file's images table
    and ``offset`` is the sum of the images of the earlier files (``manifest.json``); for a single
    store that is the store row, as in :mod:`embedstore.index`. Search with :func:`search_ivf_on_disk`.
    Returns the manifest.
    """
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(s) for s in sources]
    entries, offset = [], 0
    for p in files:
        name = _space_of(p, space)
        with h5py.File(p, "r", locking=False) as f:
            n_images = len(f["images/path"])
            n_vec = len(f[f"spaces/{name}/rows"]) if name else 0
            dim = int(f[f"spaces/{name}/vectors"].shape[1]) if name else 0
        entries.append({"file": str(p.absolute()), "space": name, "offset": offset, "images": n_images,
                        "vectors": n_vec, "dim": dim})
        offset += n_images
    with_vectors = [e for e in entries if e["vectors"]]
    if not with_vectors:
        raise StoreError(f"none of {len(files)} files holds vectors of space {space!r}: embed them first")
    dim = with_vectors[0]["dim"]
    total = sum(e["vectors"] for e in with_vectors)
    nlist = nlist or max(1, min(65536, int(4 * np.sqrt(total))))
    factory = factory or f"IVF{nlist},Flat"
    trained = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(trained)
    train_size = min(total, train_size or max(64 * ivf.nlist, 10000))

    # 1. a sample proportional to each file's size
    rng = np.random.default_rng(seed)
    sample = []
    for e in with_vectors:
        k = max(1, round(train_size * e["vectors"] / total))
        pick = np.sort(rng.choice(e["vectors"], size=min(k, e["vectors"]), replace=False))
        with h5py.File(e["file"], "r", locking=False) as f:
            sample.append(f[f"spaces/{e['space']}/vectors"][pick].astype(np.float32))
    x = np.ascontiguousarray(np.concatenate(sample))
    faiss.normalize_L2(x)
    trained.train(x)
    trained_path = out / "trained.index"
    faiss.write_index(trained, str(trained_path))

    # 2. one block per file: this step is what workers run independently
    blocks = []
    for k, e in enumerate(entries):
        if not e["vectors"]:
            continue
        block = faiss.read_index(str(trained_path))
        with h5py.File(e["file"], "r", locking=False) as f:
            vec, rows = f[f"spaces/{e['space']}/vectors"], f[f"spaces/{e['space']}/rows"]
            for s in range(0, e["vectors"], chunk):
                v = np.ascontiguousarray(vec[s:s + chunk], dtype=np.float32)
                faiss.normalize_L2(v)
                block.add_with_ids(v, rows[s:s + chunk].astype(np.int64) + e["offset"])
        path = out / f"block-{k:05d}.index"
        faiss.write_index(block, str(path))
        blocks.append(str(path))
        del block

    # 3. merge the inverted lists on disk
    index = faiss.read_index(str(trained_path))
    merge_ondisk(index, blocks, str(out / "merged.ivfdata"))
    faiss.write_index(index, str(out / "populated.index"))
    manifest = {"factory": factory, "nlist": int(ivf.nlist), "dim": dim, "vectors": int(index.ntotal),
                "train_size": int(len(x)), "files": entries, "blocks": blocks,
                "index": str(out / "populated.index"), "ivfdata": str(out / "merged.ivfdata")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def search_ivf_on_disk(out_dir: str | os.PathLike, queries: np.ndarray, k: int = 10,
                       nprobe: int = 16) -> tuple[np.ndarray, np.ndarray, list[list[tuple[str, int]]]]:
    """Search an index built by :func:`build_ivf_on_disk`: (scores, ids, [(file, row), ...] per query)."""
    import faiss

    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    index = faiss.read_index(str(out / "populated.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    faiss.extract_index_ivf(index).nprobe = nprobe
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, manifest["dim"])
    faiss.normalize_L2(q)
    scores, ids = index.search(q, k)
    offsets = np.array([e["offset"] for e in manifest["files"]])
    where = []
    for row in ids:
        hits = []
        for gid in row:
            if gid < 0:
                continue
            j = int(np.searchsorted(offsets, gid, side="right") - 1)
            hits.append((manifest["files"][j]["file"], int(gid - offsets[j])))
        where.append(hits)
    return scores, ids, where
