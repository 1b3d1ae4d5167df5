"""``embed``: reader -> mapper -> writer, incremental and crash-safe; checks the options and picks the engine.

1. discover the collection; 2. plan: skip files already embedded in this space whose size and
mtime (or, failing that, content hash) are unchanged; 3. load the backbone, only when there is
work (a rerun with nothing new never loads it); 4. decode and embed the rest in batches;
5. publish each batch as a journal part (durable, atomic); 6. fold the journal into the store.
Steps 2-6 are :func:`embedstore.pipeline.worker.run_items`; ``engine="ray"`` runs them per shard
on Ray workers (:mod:`embedstore.pipeline.ray_runner`), ``shard=(i, n)`` for one shard here.

Crash safety: a run killed at any point resumes at step 2 on the next call with nothing lost or
duplicated. An empty collection is refused before anything (store or lock) is written. Steps 1-2
import no torch, so a rerun that finds nothing new takes well under a second.
"""
from __future__ import annotations

import os
import time
from typing import Any

from .. import DEFAULT_BACKBONE
from ..backbones.registry import default_space_name
from ..choices import ENGINES, RUNTIMES, STORE_DTYPES, check_runtime_precision
from ..data.collection import MAX_FILE_BYTES, discover
from ..data.remote import Fetch
from ..errors import EmbedOptionError, ShardError
from ..store import validate_space_name
from ..utils import timed
from .shards import check_shard
from .worker import run_items


def embed(
    source: str | os.PathLike | Any,
    store: str | os.PathLike,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    space: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    runtime: str = "auto",
    workers: int | None = None,
    dtype: str = "float16",
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    engine: str = "local",
    address: str | None = None,
    shards: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    follow_symlinks: bool = False,
    max_bytes: int = MAX_FILE_BYTES,
    columns: dict[str, str] | None = None,
    fetch: Fetch | None = None,
) -> dict[str, Any]:
    """Embed a collection of images into an HDF5 store; returns a summary dict.

    Args:
        source: a folder (recursive; ``<class>/img`` or ``<split>/<class>/img`` give labels; its
            ``.tar`` files are read as webdataset shards), a ``.tar`` shard, a CSV/TSV/Parquet table
            of paths or URLs (``path[,label[,split]]``, or a header naming the columns; the table
            may be an fsspec URL itself), or a Hugging Face ``datasets.Dataset`` (an Image column):
            see :func:`embedstore.data.discover`.
        store: the ``.h5`` file to create or extend.
        backbone: registry name, timm name or ``torchvision:<name>``.
        weights: local checkpoint, ``"random"``, or None for the backbone's pretrained weights.
        space: name of the embedding space (default: derived from backbone and weights).
        batch_size: images per forward pass and per committed journal part.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        precision: ``auto`` (bf16 on CPUs that have it, fp16/bf16 on GPU), ``fp32``, ``bf16``, ``fp16``
            (the torch runtime's; the exported runtimes run fp32).
        runtime: ``auto``, ``torch``, ``onnxruntime`` or ``openvino`` (CPU): the rule of ``auto``, the
            export cache and the validation against eager torch fp32 (cosine >= 0.999 per image, else
            torch embeds, with a note in the summary) are in :mod:`embedstore.embedding.runtimes`.
            A space takes the vectors of any runtime; its attributes list the runtimes used.
        workers: decode worker processes; None (the default, the CLI's ``auto``): sized to the cores from
            the measured cost of decoding and of the model (:func:`embedstore.embedding.embedder.auto_workers`).
        dtype: stored vector type, ``float16`` (default) or ``float32``.
        progress: show a progress bar on stderr.
        shard: ``(i, n)``: embed only shard i of n (a stable hash of each relative path picks its
            shard) into ``store``'s shard file, published when complete; finished shards are
            skipped. Combine shard files with :func:`embedstore.pipeline.merge`. (The CLI's
            ``--shard I/N`` string is read by :func:`embedstore.pipeline.parse_shard`.)
        engine: ``local`` (this process) or ``ray`` (shards on a Ray cluster, then merged).
        address, shards, gpus_per_worker, cpus_per_worker: Ray engine options, see
            :func:`embedstore.pipeline.embed_ray`.
        follow_symlinks: in a folder, embed files that symlinks lead to outside the folder (by
            default they are recorded as failures).
        max_bytes: files (tar members, downloads) larger than this are recorded as failures without
            being read.
        columns: a table's columns, ``{"path": ..., "label": ..., "split": ...}`` (the CLI's
            ``--path-column``, ...); a dataset's ``{"image": ..., "label": ..., "split": ..., "key": ...}``.
        fetch: how URLs are downloaded (:class:`embedstore.data.Fetch`: timeout, retries, concurrency);
            failed downloads are recorded as failures and the run goes on.
    """
    if runtime not in RUNTIMES:
        raise EmbedOptionError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r} (--runtime)")
    check_runtime_precision(runtime, precision)
    if engine not in ENGINES:
        raise EmbedOptionError(f"engine must be one of {ENGINES}, not {engine!r} (--engine local or --engine ray)")
    if shard is not None:
        shard = check_shard(shard)
    if dtype not in STORE_DTYPES:
        raise EmbedOptionError(f"dtype must be one of {STORE_DTYPES}, not {dtype!r} (--dtype float16 or float32)")
    if batch_size < 1:
        raise EmbedOptionError(f"batch_size must be at least 1, not {batch_size} (--batch-size)")
    if max_bytes < 1:
        raise EmbedOptionError(f"max_bytes must be at least 1, not {max_bytes} (--max-file-size)")
    if engine == "ray":
        if follow_symlinks or max_bytes != MAX_FILE_BYTES or columns or fetch not in (None, Fetch()):
            raise EmbedOptionError("follow_symlinks, max_bytes, columns and fetch (--follow-symlinks, --max-file-size, "
                                   "--path-column/--label-column/--split-column, --url-*) are not supported with "
                                   "engine='ray' yet; use the local engine or --shard I/N")
        if not isinstance(source, (str, os.PathLike)):
            raise EmbedOptionError(f"engine='ray' embeds a folder, shard or table given by path, not a "
                                   f"{type(source).__name__}: use the local engine")
        if shard is not None:
            raise ShardError(f"shard={shard} (--shard) runs one shard in this process; it cannot be combined "
                             "with engine='ray' (--engine ray): leave out one of them")
        from .ray_runner import embed_ray

        return embed_ray(source, store, address=address, shards=shards, gpus_per_worker=gpus_per_worker,
                         cpus_per_worker=cpus_per_worker, backbone=backbone, weights=weights, space=space,
                         batch_size=batch_size, device=device, precision=precision, runtime=runtime,
                         workers=workers, dtype=dtype, progress=progress)
    if (address, shards, gpus_per_worker, cpus_per_worker) != (None, None, None, None):
        raise EmbedOptionError("address, shards, gpus_per_worker and cpus_per_worker need engine='ray' (--engine ray); "
                               "to run one shard here use shard=(i, n) (--shard I/N)")
    stages: dict[str, float] = {}
    t_start = time.perf_counter()
    with timed(stages, "discover"):
        root, items = discover(source, follow_symlinks, columns=columns, fetch=fetch)
    space = validate_space_name(space or default_space_name(backbone, weights))
    return run_items(store, root, items, backbone=backbone, weights=weights, space=space, batch_size=batch_size,
                     device=device, precision=precision, runtime=runtime, workers=workers, dtype=dtype,
                     progress=progress, max_bytes=max_bytes, shard=shard, stages=stages, t_start=t_start).to_dict()
