"""The mapper stage: a frozen backbone turns uint8 image batches into feature vectors.

Normalisation runs on the device (the reader ships uint8, a quarter of float32's bytes), the
network runs channels-last under autocast (bf16 on CPUs with AMX/AVX512-BF16, fp16 on GPUs),
and decoding overlaps with inference through DataLoader worker processes.

Crash safety: computes vectors in memory and writes nothing; the pipeline stores them (store/).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from functools import lru_cache
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..backbones.load import Backbone
from ..choices import PRECISIONS
from ..data.collection import MAX_FILE_BYTES, ImageItem
from ..data.reader import ImageReader, ReadResult, collate, draft_size
from ..errors import EmbedOptionError
from ..utils import cpu_cores

BATCHES_AHEAD = 1  # batches submitted to the embedder while the oldest is still being embedded
# precision name -> the dtype torch.autocast computes in (fp32: no autocast); the fine-tune stage uses it too
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU runs bf16 matrix work natively (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


@lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep glibc from returning large activation buffers to the OS after every forward pass.

    CPU inference allocates and frees tens of MB per layer; with glibc's defaults each of those
    is an mmap/munmap pair and page faults, which showed up as a third of the run time (system
    time) on a 2-core machine. Raising the mmap and trim thresholds keeps the memory reused.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, (1 << 31) - 1))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:  # torch's message lists every device type it knows
        raise EmbedOptionError(f"cannot use device {device!r} ({e}): use --device auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise EmbedOptionError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return chosen


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise EmbedOptionError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def default_workers(device: torch.device) -> int:
    """Decode workers without a measurement: on a GPU, every core but one; on a CPU with 1-2 cores, one per
    core; on more, a quarter of them.

    On 2 cores, 2 workers beat 1 on every set measured (Xeon with AMX, efficientnet_lite0 on OpenVINO
    bf16, ``embed`` img/s, 3 runs each, alternated): imagenette 224 px 377 vs 373, hymenoptera ~500 px
    263 vs 246, 3000 px photos 115 vs 85. A worker whose queue is full sleeps, so a second one costs
    the model little; where decoding is the bottleneck it is the other core.
    """
    cores = cpu_cores()
    if device.type == "cuda":
        return max(1, min(cores - 1, 16))
    return max(1, cores // 4) if cores > 2 else max(1, cores)


def size_workers(cores: int, decode_s: float, model_core_s: float) -> int:
    """Decode processes for ``cores`` when one image costs ``decode_s`` core-seconds to read and decode and
    ``model_core_s`` core-seconds of inference: the cores shared in that ratio, so the decoders keep the
    queue full while the model's threads keep the rest busy (at least 1, at most ``cores - 1``)."""
    share = cores * decode_s / max(decode_s + model_core_s, 1e-9)
    return int(min(max(1, round(share)), max(1, cores - 1)))


def auto_workers(items: Sequence[ImageItem], embedder: Any, reader: ImageReader, sample: int = 8) -> tuple[int, str]:
    """``--workers auto``: (decode processes, why). On a CPU with more than 2 cores, the cost of both stages
    is measured on the first ``sample`` local files in this process (read and decode; one forward pass of
    them, times the model's threads) and the cores are shared by :func:`size_workers`, with a note
    saying so. On a GPU, on 1-2 cores, or when the sample decodes nothing, :func:`default_workers`."""
    import time

    cores = cpu_cores()
    if embedder.device.type == "cuda" or cores <= 2:  # the rule, unmeasured: no note
        return default_workers(embedder.device), ""
    local = [i for i, it in enumerate(items[:sample * 4]) if getattr(it, "source", None) is None][:sample]
    t0 = time.perf_counter()  # local files only: a URL sampled here would be downloaded twice
    done = [r.pixels for r in (reader[i] for i in local) if isinstance(r.pixels, torch.Tensor)]
    decode_s = (time.perf_counter() - t0) / max(1, len(local))
    if not done:
        n = default_workers(embedder.device)
        return n, ""
    t0 = time.perf_counter()
    embedder(torch.stack(done))
    threads = int(getattr(embedder, "threads", 0) or torch.get_num_threads())
    model_core_s = (time.perf_counter() - t0) / len(done) * threads
    n = size_workers(cores, decode_s, model_core_s)
    return n, (f"workers auto: {n} decode process(es) for {cores} cores (measured per image: decode "
               f"{decode_s * 1e3:.1f} ms, model {model_core_s * 1e3:.1f} core-ms on {threads} threads)")


class Embedder:
    """Runs a backbone on batches of uint8 CHW images and returns float32 vectors (eager torch).

    The exported runtimes (:mod:`.onnx`, chosen by :func:`.runtimes.load_embedder`) keep the same
    contract and attributes: ``backbone``, ``device``, ``precision``, ``runtime`` (what the space's
    lineage records), ``min_cosine`` (validated against eager fp32; None here) and ``notes``.
    """

    min_cosine: float | None = None

    def __init__(self, backbone: Backbone, device: str = "auto", precision: str = "auto"):
        self.backbone = backbone
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.notes: list[str] = []  # what the runtime choice wants the run summary to say
        if self.device.type == "cpu":
            tune_allocator()
        self.model = backbone.model.to(self.device, memory_format=torch.channels_last).eval()
        cfg = backbone.data_config
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1) * 255

    @property
    def runtime(self) -> str:
        """``"torch 2.4.1 bf16"``: the runtime, its version and the precision it computes in."""
        return f"torch {torch.__version__.split('+')[0]} {self.precision}"

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.to(self.device, non_blocking=True).float()
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES.get(self.precision), enabled=self.precision != "fp32"):
            out = self.model(x)
        return out.float().cpu().numpy()

    def submit(self, batch: torch.Tensor) -> Future:
        """Embed ``batch`` now (torch's threads share each operator) and return its vectors as a done future:
        the call contract of the exported runtimes, which queue batches (:class:`.onnx.Streams`)."""
        return done_future(self(batch))


def done_future(value: Any) -> Future:
    """A future that already holds ``value``: what an embedder that computes at once returns from ``submit``."""
    done: Future = Future()
    done.set_result(value)
    return done


def iter_embeddings(
    items: Sequence[ImageItem],
    embedder: Embedder,
    batch_size: int = 64,
    workers: int | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    decoder: str = "auto",
) -> Iterator[tuple[list[ReadResult], np.ndarray]]:
    """Yield (results, vectors) per batch, in order: vectors has one row per result without an error.

    Each batch is submitted to the embedder before the one ahead of it is collected (``BATCHES_AHEAD``),
    so a runtime that queues batches (:class:`.onnx.Streams`) never waits between them. When reading or
    submitting a batch fails, the batches already submitted are handed on first, then the error is raised.

    Files over ``max_bytes`` (and anything but regular files) come back as failed results.
    ``workers``: decode worker processes (None: :func:`auto_workers`, noted in ``embedder.notes``). ``decoder``: see
    :class:`embedstore.data.decode.Decoder`; ``"auto"`` decodes JPEGs on the device, batched
    (:mod:`embedstore.data.device_decode`), when that is a CUDA GPU, and in the workers otherwise.
    """
    if not items:
        return
    from ..data.device_decode import collate_encoded, finish_batch, use_device_decode

    if decoder == "auto" and use_device_decode(embedder.device):
        decoder = "device"
    reader = ImageReader(items, embedder.backbone.eval_transform(), draft_size(embedder.backbone.data_config),
                         max_bytes, decoder=decoder)
    if workers is None:
        workers, why = auto_workers(items, embedder, reader)
        embedder.notes.extend([why] if why else [])
    on_device = reader.decode.decoder == "device"
    loader = torch.utils.data.DataLoader(
        reader,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_encoded if on_device else collate,
        pin_memory=embedder.device.type == "cuda" and not on_device,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    empty = np.empty((0, embedder.backbone.dim), np.float32)
    pending: deque[tuple[list[ReadResult], Any]] = deque()  # batches submitted, oldest first
    failure: Exception | None = None
    try:
        for results, batch in loader:
            if on_device:  # JPEGs still encoded: decoded here, on the device, as one batch
                batch = finish_batch(results, batch, reader.decode, embedder.device)
            pending.append((results, embedder.submit(batch) if batch is not None else None))
            if len(pending) > BATCHES_AHEAD:
                results, vectors = pending.popleft()
                yield results, vectors.result() if vectors is not None else empty
    except Exception as e:  # noqa: BLE001 - raised below, after the batches already submitted are handed on
        failure = e
    while pending:
        results, vectors = pending.popleft()
        yield results, vectors.result() if vectors is not None else empty
    if failure is not None:
        raise failure


def embed_items(
    items: Sequence[ImageItem], embedder: Embedder, batch_size: int = 64, workers: int | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> tuple[np.ndarray, list[ReadResult]]:
    """Embed items in memory: (vectors aligned with items, NaN rows for failures; all results)."""
    out = np.full((len(items), embedder.backbone.dim), np.nan, dtype=np.float32)
    all_results: list[ReadResult] = []
    for results, vectors in iter_embeddings(items, embedder, batch_size, workers, max_bytes):
        ok = [r.index for r in results if not r.error]
        out[ok] = vectors
        all_results.extend(results)
    return out, all_results
