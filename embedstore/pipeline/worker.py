"""The one embedding loop: plan a listed collection against a store, embed what is new in batches, commit.

Used by :func:`embedstore.pipeline.embed` (this process, whole store or one shard) and by the
Ray engine's worker actors (one shard each, with a backbone loaded once per actor).

Crash safety: every batch is published as a durable journal part by ``StoreWriter.commit``, in
order, on a committer thread (the journal's writes and fsyncs overlap the next batches' inference; at
most ``COMMITS_AHEAD`` batches wait; a run that fails commits what it had embedded, then raises). The
journal is folded into the store (and a shard's work file published by one rename) only at the end,
so a run killed at any point resumes with nothing lost or duplicated.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence

from tqdm import tqdm

from ..data.collection import ImageItem
from ..store import Batch, StoreWriter, check_space_compatible
from ..utils import timed
from .plan import plan, rebase_onto
from .shards import ShardJob, prepare_shard
from .summary import RunSummary, rate

COMMITS_AHEAD = 2  # batches whose journal part is being written while the next ones are embedded

if TYPE_CHECKING:
    from ..backbones.load import Backbone
    from ..embedding.embedder import Embedder


def embed_batches(todo: Sequence[ImageItem], embedder: Embedder, writer: StoreWriter, space: str,
                  attrs: dict[str, Any], *, batch_size: int, workers: int | None, max_bytes: int,
                  progress: bool, bar: Any = None) -> tuple[int, int]:
    """Decode, embed and commit ``todo`` batch by batch (one journal part each); returns (embedded, failed).

    ``bar``: a progress bar to advance (left open: a caller that embeds in several calls keeps one);
    by default one is made for ``todo`` and closed at the end.
    """
    from ..embedding.embedder import iter_embeddings  # torch: imported only when there is work

    embedded = failed = 0
    own = bar is None
    if own:
        bar = tqdm(total=len(todo), unit="img", desc=f"embed {space}", disable=not progress, file=sys.stderr)
    pending: deque[Future] = deque()  # commits in flight, oldest first: at most COMMITS_AHEAD
    committer = ThreadPoolExecutor(1, thread_name_prefix="embedstore-commit")
    try:
        for results, vectors in iter_embeddings(todo, embedder, batch_size, workers, max_bytes):
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
            while len(pending) >= COMMITS_AHEAD:
                pending.popleft().result()  # a failed commit raises here, before more is embedded
            pending.append(committer.submit(_commit, writer, batch, space, attrs, bar, len(results)))
        while pending:
            pending.popleft().result()
    finally:
        committer.shutdown(wait=True)  # batches already embedded are committed even when the loop failed
        if own:
            bar.close()
    return embedded, failed


def _commit(writer: StoreWriter, batch: Batch, space: str, attrs: dict[str, Any], bar: Any, n: int) -> None:
    writer.commit(batch, space, attrs)
    bar.update(n)


def run_items(store: str | os.PathLike, root: str, items: Sequence[ImageItem], *, backbone: str,
              weights: str | None, space: str, batch_size: int, device: str, precision: str,
              workers: int | None, dtype: str, progress: bool, max_bytes: int, runtime: str = "auto",
              shard: tuple[int, int] | None = None, loaded: Backbone | None = None,
              stages: dict[str, float] | None = None, t_start: float | None = None) -> RunSummary:
    """Embed the listed ``items`` (of the collection at ``root``) into ``store`` or its shard ``(i, n)``.

    Arguments are checked by the caller. ``runtime``: see :mod:`embedstore.embedding.runtimes` (its
    validation and probe read a few of ``todo``'s images). ``loaded``: the backbone for
    ``backbone``/``weights``, when already loaded (a Ray actor reuses one); ``stages``/``t_start``:
    timings started by the caller.
    """
    stages = {} if stages is None else stages
    t_start = time.perf_counter() if t_start is None else t_start
    items = list(items)
    job: ShardJob | None = None
    if shard is not None:
        job = prepare_shard(store, root, items, shard, space)
        if job.done:
            return job.skipped_summary(backbone)
        root, items = job.root, job.items
    with StoreWriter(job.work if job is not None else store, root=root) as writer:
        with timed(stages, "plan"):
            snapshot = writer.snapshot()  # no vector is read to plan
            prev = snapshot.spaces.get(space) if snapshot is not None else None
            if prev is None and job is not None and job.base is not None:
                prev = job.base.spaces.get(space)  # a shard extends the target store's space
            _, items = rebase_onto(snapshot, root, items)
            todo, unchanged, known_failed = plan(items, snapshot, space)
            if job is not None and job.base is not None:  # skip what the target store already has
                todo, more_unchanged, more_failed = plan(todo, job.base, space)
                unchanged, known_failed = unchanged + more_unchanged, known_failed + more_failed
        embedded = failed = 0
        t_embed = time.perf_counter()
        if todo:
            from ..backbones.load import load_backbone  # torch and timm: imported only when there is work
            from ..embedding.runtimes import load_embedder

            with timed(stages, "load_backbone"):
                assert loaded is None or loaded.name == backbone, (loaded.name, backbone)
                bb = loaded if loaded is not None else load_backbone(backbone, weights)
            with timed(stages, "runtime"):  # export, validation, probe: the first time only (cached)
                embedder = load_embedder(bb, runtime, device, precision, items=todo, images=len(todo),
                                         batch_size=batch_size, max_bytes=max_bytes)
            weights_source, device_type, used_precision = bb.weights, embedder.device.type, embedder.precision
            used_runtime = embedder.runtime
            attrs = {**bb.space_attrs(), "dtype": dtype, "precision": used_precision, "device": device_type,
                     **runtime_attrs(embedder)}
            if prev is not None:
                check_space_compatible(prev.attrs, attrs, space)  # the runtime may differ (see runtime_attrs)
                attrs["dtype"] = prev.attrs.get("dtype", dtype)
            attrs["created"] = prev.attrs.get("created") if prev is not None else time.strftime("%Y-%m-%dT%H:%M:%S%z")
            t_embed = time.perf_counter()
            with timed(stages, "embed"):
                embedded, failed = embed_batches(todo, embedder, writer, space, attrs, batch_size=batch_size,
                                                 workers=workers, max_bytes=max_bytes, progress=progress)
            notes = tuple(embedder.notes)  # the runtime's choice, and how the decode workers were sized
        else:  # nothing to do: no backbone loaded (its weights need not even be present), torch not imported
            recorded = prev.attrs if prev is not None else {}
            weights_source = str(recorded.get("weights", weights or ""))
            device_type, used_precision = str(recorded.get("device", device)), str(recorded.get("precision", precision))
            used_runtime, notes = "", ()
            stages["embed"] = 0.0
        embed_seconds = time.perf_counter() - t_embed
        with timed(stages, "write"):
            writer.consolidate()
            if job is not None:
                job.publish()
    extra = {"shard": job.label, "shard_file": str(job.final), "shard_skipped": False} if job else {}
    return RunSummary(
        str(store), space, backbone, weights_source, device_type, used_precision, len(items),
        embedded=embedded, unchanged=unchanged, failed=failed, known_failures=known_failed,
        seconds=time.perf_counter() - t_start, images_per_s=rate(embedded + failed, embed_seconds if todo else 0.0),
        runtime=used_runtime, notes=notes, stages=stages, extra=extra,
    )


def runtime_attrs(embedder: Any) -> dict[str, Any]:
    """The lineage of the runtime: ``runtime`` (``"onnxruntime 1.18.0"``, ``"openvino 2026.4.1 bf16"``,
    ``"torch 2.4.1 fp32"``), ``runtimes``
    (every runtime that has added vectors to the space; the store merges them, store.integrity.merge_runtimes)
    and ``runtime_min_cosine`` (an exported runtime's lowest validated cosine to eager torch fp32).

    The runtime is not part of the space's identity (backbone, weights, preprocessing are): a space
    takes vectors of any runtime. The exported runtimes agree with eager torch fp32 per image to a
    cosine of 0.999 or better in fp32, 0.99 in bf16 (validated); torch's bf16/fp16 autocast differs
    from fp32 by its own rounding (EfficientNet-Lite0 on real photos: min 0.994, median 0.9995)."""
    return {"runtime": embedder.runtime, "runtimes": [embedder.runtime], "runtime_min_cosine": embedder.min_cosine}
