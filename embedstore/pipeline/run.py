"""``embed``: reader -> mapper -> writer, incremental and crash-safe.

1. discover the collection; 2. plan: skip files already embedded in this space whose size and
mtime (or, failing that, content hash) are unchanged; 3. load the backbone, only when there is
work (a rerun with nothing new never loads it); 4. decode and embed the rest in batches;
5. publish each batch as a journal part (durable, atomic); 6. fold the journal into the store.
A run killed at any point resumes at step 2 on the next call with nothing lost or duplicated.
An empty collection is refused before anything (store or lock) is written. Steps 1-2 import no
torch, so a rerun that finds nothing new takes well under a second.
"""
from __future__ import annotations

import os
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from tqdm import tqdm

from .. import DEFAULT_BACKBONE
from ..data.collection import MAX_FILE_BYTES, ImageItem, discover
from ..backbones.registry import default_space_name
from ..store.store import Batch, Store, StoreWriter, check_space_compatible, failure_keys, validate_space_name
from ..utils import hash_file, timed

if TYPE_CHECKING:
    from ..backbones.load import Backbone
    from .distributed import ShardJob

STORE_DTYPES = ("float16", "float32")
ENGINES = ("local", "ray")


def plan(items: list[ImageItem], store: Store | None, space: str) -> tuple[list[ImageItem], int, int]:
    """Split items into (to embed, unchanged, known failures) for one space."""
    if store is None:
        return list(items), 0, 0
    index = {p: i for i, p in enumerate(store.images["path"])}
    embedded = set(store.spaces[space].rows.tolist()) if space in store.spaces else set()
    failed = failure_keys(store)
    todo, unchanged, known_failed = [], 0, 0
    for it in items:
        try:
            st = os.stat(it.path)
        except OSError:
            todo.append(it)  # the reader records why
            continue
        row = index.get(it.rel)
        if row is not None and row in embedded and stat.S_ISREG(st.st_mode):  # never hash a FIFO or device
            if store.images["size"][row] == st.st_size and store.images["mtime"][row] == st.st_mtime:
                unchanged += 1
                continue
            if store.images["size"][row] == st.st_size and store.images["hash"][row] == hash_file(it.path):
                unchanged += 1  # touched but identical content
                continue
        prev = failed.get((it.rel, space))
        if prev is not None and prev == (st.st_size, st.st_mtime):
            known_failed += 1
            continue
        todo.append(it)
    return todo, unchanged, known_failed


def embed(
    source: str | os.PathLike,
    store: str | os.PathLike,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    space: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    dtype: str = "float16",
    progress: bool = True,
    shard: tuple[int, int] | str | None = None,
    engine: str = "local",
    address: str | None = None,
    shards: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    discovered: tuple[str, Sequence[ImageItem]] | None = None,
    preloaded: Backbone | None = None,
    follow_symlinks: bool = False,
    max_bytes: int = MAX_FILE_BYTES,
) -> dict[str, Any]:
    """Embed a folder or CSV list of images into an HDF5 store; returns a summary dict.

    Args:
        source: a folder (recursive; ``<class>/img`` or ``<split>/<class>/img`` give labels) or
            a CSV list of ``path[,label[,split]]``.
        store: the ``.h5`` file to create or extend.
        backbone: registry name, timm name or ``torchvision:<name>``.
        weights: local checkpoint, ``"random"``, or None for the backbone's pretrained weights.
        space: name of the embedding space (default: derived from backbone and weights).
        batch_size: images per forward pass and per committed journal part.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        precision: ``auto`` (bf16 on CPUs that have it, fp16/bf16 on GPU), ``fp32``, ``bf16``, ``fp16``.
        workers: decode worker processes (default: derived from the device and cores).
        dtype: stored vector type, ``float16`` (default) or ``float32``.
        progress: show a progress bar on stderr.
        shard: ``(i, n)`` or ``"i/n"``: embed only shard i of n (a stable hash of each relative
            path picks its shard) into ``store``'s shard file, published when complete; finished
            shards are skipped. Combine shard files with :func:`embedstore.pipeline.merge`.
        engine: ``local`` (this process) or ``ray`` (shards on a Ray cluster, then merged).
        address, shards, gpus_per_worker, cpus_per_worker: Ray engine options, see
            :func:`embedstore.pipeline.embed_ray`.
        discovered: ``(root, items)`` as returned by ``discover(source)``, when already listed.
        preloaded: the loaded backbone for ``backbone``/``weights`` (workers reuse one per process).
        follow_symlinks: in a folder, embed files that symlinks lead to outside the folder (by
            default they are recorded as failures).
        max_bytes: files larger than this are recorded as failures without being read.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if engine == "ray":
        if follow_symlinks or max_bytes != MAX_FILE_BYTES:
            raise ValueError("follow_symlinks and max_bytes (--follow-symlinks, --max-file-size) are not "
                             "supported with engine='ray' yet; use the local engine or --shard I/N")
        if shard is not None:
            raise ValueError("--shard runs one shard in this process; it cannot be combined with --engine ray")
        from .distributed import embed_ray

        return embed_ray(source, store, address=address, shards=shards, gpus_per_worker=gpus_per_worker,
                         cpus_per_worker=cpus_per_worker, backbone=backbone, weights=weights, space=space,
                         batch_size=batch_size, device=device, precision=precision, workers=workers,
                         dtype=dtype, progress=progress)
    if (address, shards, gpus_per_worker, cpus_per_worker) != (None, None, None, None):
        raise ValueError("address, shards, gpus_per_worker and cpus_per_worker need engine='ray' (--engine ray); "
                         "to run one shard here use shard=(i, n) (--shard I/N)")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {STORE_DTYPES}, not {dtype!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")
    stages: dict[str, float] = {}
    t_start = time.perf_counter()
    with timed(stages, "discover"):
        root, items = discovered if discovered is not None else discover(source, follow_symlinks)
        items = list(items)
    space = validate_space_name(space or default_space_name(backbone, weights))
    job: ShardJob | None = None
    if shard is not None:
        from .distributed import prepare_shard

        job = prepare_shard(store, root, items, shard, space)
        if job.done:
            return job.skipped_summary(backbone)
        root, items = job.root, job.items
    with StoreWriter(job.work if job is not None else store, root=root) as writer:
        with timed(stages, "plan"):
            snapshot = writer.snapshot()
            prev = snapshot.spaces.get(space) if snapshot is not None else None
            if prev is None and job is not None and job.base is not None:
                prev = job.base.spaces.get(space)  # a shard extends the target store's space
            if snapshot is not None and snapshot.root and snapshot.root != root:
                items = [_rebase(it, snapshot.root) for it in items]
            todo, unchanged, known_failed = plan(items, snapshot, space)
            if job is not None and job.base is not None:  # skip what the target store already has
                todo, more_unchanged, more_failed = plan(todo, job.base, space)
                unchanged, known_failed = unchanged + more_unchanged, known_failed + more_failed
        if todo:
            from ..backbones.load import load_backbone  # torch and timm: imported only when there is work
            from ..embedding.embedder import Embedder, iter_embeddings

            with timed(stages, "load_backbone"):
                if preloaded is not None and preloaded.name != backbone:
                    raise ValueError(f"preloaded backbone is {preloaded.name!r}, not {backbone!r}")
                bb = preloaded if preloaded is not None else load_backbone(backbone, weights)
                embedder = Embedder(bb, device=device, precision=precision)
            weights_source, device_type, used_precision = bb.weights, embedder.device.type, embedder.precision
            attrs = {**bb.space_attrs(), "dtype": dtype, "precision": used_precision, "device": device_type}
            if prev is not None:
                check_space_compatible(prev.attrs, attrs, space)
                attrs["dtype"] = prev.attrs.get("dtype", dtype)
            attrs["created"] = prev.attrs.get("created") if prev is not None else time.strftime("%Y-%m-%dT%H:%M:%S%z")
        else:  # nothing to do: no backbone loaded (its weights need not even be present), torch not imported
            recorded = prev.attrs if prev is not None else {}
            weights_source = str(recorded.get("weights", weights or ""))
            device_type, used_precision = str(recorded.get("device", device)), str(recorded.get("precision", precision))
        embedded = failed = 0
        bar = tqdm(total=len(todo), unit="img", desc=f"embed {space}", disable=not progress, file=sys.stderr)
        t_embed = time.perf_counter()
        with timed(stages, "embed"):
            for results, vectors in iter_embeddings(todo, embedder, batch_size, workers, max_bytes) if todo else ():
                batch = Batch()
                k = 0
                for r in results:
                    it = todo[r.index]
                    if r.error:
                        batch.add_failure(path=it.rel, space=space, error=r.error, message=r.message,
                                          size=r.size, mtime=r.mtime)
                        failed += 1
                    else:
                        batch.add_image(vectors[k], path=it.rel, label=it.label, split=it.split,
                                        size=r.size, hash=r.hash, mtime=r.mtime)
                        k += 1
                        embedded += 1
                writer.commit(batch, space, attrs)
                bar.update(len(results))
        bar.close()
        embed_seconds = time.perf_counter() - t_embed
        with timed(stages, "write"):
            writer.consolidate()
            if job is not None:
                job.publish()
    seconds = time.perf_counter() - t_start
    extra = {"shard": f"{job.index}/{job.count}", "shard_file": str(job.final), "shard_skipped": False} if job else {}
    return {
        "store": str(store),
        "space": space,
        "backbone": backbone,
        "weights": weights_source,
        "device": device_type,
        "precision": used_precision,
        "images": len(items),
        "embedded": embedded,
        "skipped": unchanged + known_failed,
        "unchanged": unchanged,
        "failed": failed,
        "known_failures": known_failed,
        "seconds": round(seconds, 3),
        "images_per_s": round((embedded + failed) / embed_seconds, 2) if embed_seconds > 0 and todo else 0.0,
        "stages": {k: round(v, 3) for k, v in stages.items()},
        **extra,
    }


def _rebase(item: ImageItem, root: str) -> ImageItem:
    """Express an item's path relative to the store's original root (absolute when outside it)."""
    rel = os.path.relpath(item.path, root)
    if rel.startswith(".."):
        rel = item.path
    return ImageItem(item.path, rel, item.label, item.split, item.refusal)

