"""The Ray engine: shards of a collection on worker actors (one backbone each), then merged into the store.

Any scheduler can run shards (``embedstore embed PATH --store FILE.h5 --shard I/N`` in a Slurm
array or Kubernetes job, then ``embedstore merge FILE.h5``); :func:`embed_ray` does it on a Ray
cluster with one backbone per worker actor and Ray's actor restarts and task retries for
workers that die. Images and stores must sit on a file system that every worker sees.

Fault injection (tests only): when the environment variable ``EMBEDSTORE_TEST_KILL_SHARD``
(:data:`KILL_ENV`) is set to ``I:FLAGFILE[:PARTS]`` in the process calling :func:`embed_ray`, it
is passed to the worker actors (Ray ``runtime_env``), and the worker running shard ``I`` kills
its own process (``os._exit``) once ``PARTS`` (default 1) journal parts of that shard are
published, the first time only (FLAGFILE records it). It exists to test that a worker dying
mid-shard loses and duplicates nothing; leave it unset otherwise.

Crash safety: each shard is an ordinary resumable shard run (see :mod:`embedstore.pipeline.worker`);
a dead worker's shard resumes from its last published journal part, and the final merge applies
each published shard once, so no row is lost or duplicated.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from .. import DEFAULT_BACKBONE
from ..backbones.registry import default_space_name
from ..data.collection import MAX_FILE_BYTES, ImageItem, discover
from ..errors import EmbedOptionError, EngineError, ShardError
from ..store import journal_dir, validate_space_name
from .merge import merge
from .plan import plan_view, rebase_onto
from .shards import MAX_SHARDS, published_shards, shard_file, shard_of, work_file
from .summary import RunSummary, rate
from .worker import run_items

RUN_OPTIONS = ("batch_size", "device", "precision", "runtime", "workers", "dtype")  # passed on to each shard run
KILL_ENV = "EMBEDSTORE_TEST_KILL_SHARD"  # fault injection for tests: "I:FLAGFILE[:PARTS]", see the module docstring


class ShardWorker:
    """A Ray actor: one backbone (one per GPU or CPU worker), loaded once, embeds shard after shard."""

    def __init__(self, backbone: str, weights: str | None) -> None:
        self.backbone_name, self.weights = backbone, weights
        self.bb: Any = None  # the loaded Backbone
        self.first_run = True  # a restarted actor reports its restart with its first shard only

    def run(self, store: str, i: int, n: int, root: str, items: list[ImageItem],
            options: dict[str, Any]) -> dict[str, Any]:
        import ray

        if self.bb is None:
            from ..backbones.load import load_backbone  # torch and timm, in the worker only

            self.bb = load_backbone(self.backbone_name, self.weights)
        stop = _arm_kill(store, i, n)
        try:
            out = run_items(store, root, items, shard=(i, n), loaded=self.bb, backbone=self.backbone_name,
                            weights=self.weights, progress=False, max_bytes=MAX_FILE_BYTES, **options).to_dict()
        finally:
            stop.set()
        with warnings.catch_warnings():  # deprecated in Ray 2.x, still the only restart flag
            warnings.simplefilter("ignore")
            out["restarted"] = self.first_run and bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.first_run = False
        out["node"] = os.uname().nodename
        return out


def _arm_kill(store: str, i: int, n: int) -> threading.Event:
    """Fault injection (see the module docstring): die once PARTS parts of shard I are published.

    Returns the event that disarms it (set when the shard returns)."""
    stop = threading.Event()
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return stop
    index, flag, *rest = spec.split(":")
    parts = int(rest[0]) if rest else 1
    if int(index) != i or os.path.exists(flag):
        return stop
    Path(flag).write_text("armed")
    journal = journal_dir(work_file(store, i, n))

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
        raise EngineError(
            f"cannot reach a Ray cluster at {address!r} ({type(e).__name__}: {e}): start one with `ray start --head` "
            "on the head node, or leave out --address to run a local Ray here"
        ) from None
    return True


def _worker_shape(resources: dict[str, float], gpus_per_worker: float | None,
                  cpus_per_worker: float | None) -> tuple[float, float, int]:
    """(GPUs, CPUs, number) of worker actors that fit the cluster."""
    gpus = (1.0 if resources.get("GPU", 0.0) >= 1 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if gpus > 0:
        if resources.get("GPU", 0.0) < gpus:
            raise EngineError(f"the Ray cluster has {resources.get('GPU', 0):g} GPUs, fewer than "
                              f"--gpus-per-worker {gpus:g}: lower it, or 0 for CPU workers")
        return gpus, cpus_per_worker or 1.0, int(resources.get("GPU", 0.0) // gpus)
    cpus = cpus_per_worker or min(2.0, resources.get("CPU", 1.0))
    return gpus, cpus, max(1, int(resources.get("CPU", 1.0) // cpus))


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
        options: the other :func:`embedstore.pipeline.embed` options (batch_size, device, precision,
            runtime, workers, dtype).
    A dead worker's shard resumes from its last published journal part; the merge applies each
    shard once, so no row is lost or duplicated.
    """
    try:
        import ray
    except ImportError:
        raise EngineError('--engine ray needs Ray: pip install -e ".[ray]" in a checkout, or pip install ray '
                          "(or --engine local)") from None
    from tqdm import tqdm

    if shards is not None and not 1 <= shards <= MAX_SHARDS:
        raise ShardError(f"shards must be 1..{MAX_SHARDS}, not {shards} (--shards)")
    unknown = sorted(set(options) - set(RUN_OPTIONS))
    if unknown:  # before Ray is started or any actor created
        raise EmbedOptionError(f"embed_ray got unknown options {unknown}: it takes {', '.join(RUN_OPTIONS)}")
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    store = Path(store).absolute()
    space = validate_space_name(space or default_space_name(backbone, weights))
    opts = {"batch_size": 64, "device": "auto", "precision": "auto", "runtime": "auto", "workers": None,
            "dtype": "float16",
            **{k: v for k, v in options.items() if v is not None}, "space": space}
    root, items = discover(source)
    stages["discover"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    started = _connect(address)
    gpus, cpus, n_workers = _worker_shape(ray.cluster_resources(), gpus_per_worker, cpus_per_worker)
    n = shards or 4 * n_workers
    stale = [p for _, m, p in published_shards(store) if m != n]
    if stale:  # finished shards of an earlier run with another shard count
        merge(store, stale)
    root, items = rebase_onto(plan_view(store), root, items)
    by_shard: dict[int, list[ImageItem]] = {i: [] for i in range(n)}
    for it in items:
        by_shard[shard_of(it.rel, n)].append(it)
    pending = [i for i in range(n) if not shard_file(store, i, n).exists()]
    n_workers = max(1, min(n_workers, len(pending)))
    actor_options: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=max_retries,
                                         max_task_retries=max_retries)
    if os.environ.get(KILL_ENV):  # fault injection for tests, read by the actor (see the module docstring)
        actor_options["runtime_env"] = {"env_vars": {KILL_ENV: os.environ[KILL_ENV]}}
    actor_cls = ray.remote(ShardWorker).options(**actor_options)
    actors = [actor_cls.remote(backbone, weights) for _ in range(n_workers)] if pending else []
    stages["schedule"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    queue = list(pending)
    inflight: dict[Any, tuple[Any, int]] = {}

    def submit(actor: Any) -> None:
        i = queue.pop(0)
        ref = actor.run.remote(str(store), i, n, root, by_shard[i], opts)
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
                raise EngineError(f"shard {i}/{n} of {store} failed: {type(cause).__name__}: {cause}") from None
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
        raise EngineError(
            f"{len(errors)} shard(s) of {store} failed after {max_retries} retries: {'; '.join(errors[:5])}. "
            "Finished shards are kept; run the same command again to do the rest"
        )
    t0 = time.perf_counter()
    merged = merge(store, [p for _, m, p in published_shards(store) if m == n])
    stages["merge"] = time.perf_counter() - t0
    ran = [r for r in results if not r["shard_skipped"]]
    embedded, failed = sum(r["embedded"] for r in ran), sum(r["failed"] for r in ran)
    return RunSummary(
        str(store), space, backbone, next((r["weights"] for r in ran), None), next((r["device"] for r in ran), ""),
        next((r["precision"] for r in ran), ""), len(items), embedded=embedded,
        unchanged=sum(r["unchanged"] for r in ran), failed=failed,
        known_failures=sum(r["known_failures"] for r in ran), seconds=time.perf_counter() - t_start,
        images_per_s=rate(embedded + failed, stages["embed"] if ran else 0.0), stages=stages,
        runtime=", ".join(dict.fromkeys(r["runtime"] for r in ran if r.get("runtime"))),
        notes=tuple(dict.fromkeys(n for r in ran for n in r.get("notes", ()))),
        skipped_extra=sum(len(by_shard[i]) for i in range(n) if i not in pending),
        extra={
            "engine": "ray", "shards": n, "shards_run": len(results), "shards_skipped": n - len(pending),
            "workers": n_workers if pending else 0, "gpus_per_worker": gpus, "cpus_per_worker": cpus,
            "worker_restarts": sum(bool(r.get("restarted")) for r in results), "merged_files": merged["merged"],
            "per_shard": [{k: r.get(k) for k in ("shard", "embedded", "failed", "seconds", "images_per_s",
                                                 "restarted", "node")} for r in results],
        },
    ).to_dict()
