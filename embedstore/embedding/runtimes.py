"""Which inference runtime embeds a run: eager torch, or the exported graph on ONNX Runtime or OpenVINO.

``runtime`` (``embed(runtime=...)``, ``embedstore embed --runtime``):

* ``torch``: eager PyTorch (:class:`.embedder.Embedder`) at ``precision`` (auto: fp16/bf16 on a
  GPU, bf16 on AMX/AVX512-BF16 CPUs, else fp32).
* ``onnxruntime`` / ``openvino``: the backbone exported once to ONNX and cached (:mod:`.onnx`),
  run on the CPU: ONNX Runtime in fp32, OpenVINO at ``precision`` (auto: bf16 on AMX/AVX512-BF16
  CPUs, as for torch, else fp32). Before its first use on a backbone at a precision, the runtime
  is validated against eager torch fp32 on a few of the run's own images: the cosine similarity of
  every image must reach :data:`TOLERANCES` (0.999 in fp32; 0.99 in bf16, where torch's own bf16
  autocast lands). The result is recorded with the cache entry; a runtime that fails it (or cannot
  export the backbone) is refused for that backbone with a note in the run summary, and torch
  embeds instead.
* ``auto``, a measured probe: torch on a CUDA device, or when ``precision`` asks for fp16 (only
  torch does it). On a CPU, a run of at least :data:`AUTO_MIN_IMAGES` images (or any run, once
  this machine has probed this backbone) times torch at its precision (bf16 on AMX/AVX512-BF16
  CPUs, else fp32) against each installed exported runtime that validates, at the same precision
  where it has it (ONNX Runtime: fp32; an explicit ``bf16`` leaves it out): one warm-up and
  :data:`PROBE_ROUNDS` timed batches each of the run's images, alternating. The fastest wins, but an
  exported runtime must be at least :data:`MIN_GAIN` (10%) faster than torch. The decision is
  cached per machine (CPU model and flags, threads), backbone, batch size, precisions and versions.
  Smaller runs with no probe on record embed with torch: exporting would cost more than it saves.
  (Measured on 2 cores of a Xeon with AMX, EfficientNet-Lite0, batch 64: OpenVINO bf16 583, ONNX
  Runtime fp32 251, OpenVINO fp32 231, torch bf16 152 images/s.)

A space embedded by one runtime accepts vectors from another: every runtime's vectors are checked
against eager fp32 per image (the validation: 0.999 in fp32, 0.99 in bf16); torch's bf16 autocast
differs from fp32 by its own rounding (EfficientNet-Lite0, real photos: min 0.994, median 0.9995).
The space's lineage lists every runtime used (``runtime``, ``runtimes``, ``runtime_min_cosine``).

Crash safety: writes only the cache (:mod:`.onnx`'s entries, and ``probe-*.json`` through
:mod:`embedstore._atomic`; a damaged probe file reads as missing and the probe runs again).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import Future
from typing import Any, Sequence, Union

import numpy as np
import torch

from .._atomic import atomic_write_text
from .._hashing import sha256_bytes
from .._vectors import cosines
from ..backbones.load import Backbone
from ..choices import RUNTIME_PRECISIONS, RUNTIMES, check_runtime_precision
from ..data.collection import MAX_FILE_BYTES, ImageItem
from ..errors import EmbedOptionError, RuntimeUnavailableError
from .embedder import Embedder, done_future, iter_embeddings, resolve_device, resolve_precision
from .onnx import EXPORTED, SessionEmbedder, cache_root, runtime_version, torch_version

# cosine similarity to eager torch fp32, per image, that an exported runtime must reach: fp32 runtimes agree to
# rounding; a bf16 one is held to what torch's own bf16 autocast reaches (EfficientNet-Lite0, 1068 imagenette
# and hymenoptera photos: torch bf16 min 0.9937, median 0.9995; OpenVINO bf16 min 0.9928, median 0.9994)
TOLERANCES = {"fp32": 0.999, "bf16": 0.99}
TOLERANCE = TOLERANCES["fp32"]
AUTO_MIN_IMAGES = 1000  # auto probes the exported runtimes for runs of at least this many images
SAMPLE_IMAGES = 8  # images of the run that validate a runtime
PROBE_BATCH = 32  # images per timed probe batch (at most the run's batch size)
PROBE_ROUNDS = 3  # timed batches per candidate, after one warm-up
MIN_GAIN = 1.10  # an exported runtime must be this much faster than torch to be chosen

AnyEmbedder = Union[Embedder, SessionEmbedder]


class _Capture:
    """Stands in for an embedder in :func:`iter_embeddings` to keep the decoded uint8 batch."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone, self.device, self.batch = backbone, torch.device("cpu"), None

    def submit(self, batch: torch.Tensor) -> Future:
        """Keep the first batch (vectors of zeros come back)."""
        self.batch = batch if self.batch is None else self.batch
        return done_future(np.zeros((len(batch), self.backbone.dim), np.float32))


def sample_images(items: Sequence[ImageItem], backbone: Backbone, n: int = SAMPLE_IMAGES,
                  max_bytes: int = MAX_FILE_BYTES) -> torch.Tensor | None:
    """Up to ``n`` of ``items`` (spread over the list), decoded as the run decodes them: a uint8 batch,
    or None when none of the first few can be read."""
    step = max(1, len(items) // (4 * n))
    capture = _Capture(backbone)
    for _ in iter_embeddings(list(items[::step][:4 * n]), capture, batch_size=n, workers=0, max_bytes=max_bytes):
        if capture.batch is not None:
            return capture.batch
    return None


def synthetic_images(backbone: Backbone, n: int = 4) -> torch.Tensor:
    """Smooth seeded images (for validation when no real image is given; such a result is not recorded)."""
    h, w = backbone.data_config["input_size"][1:]
    g = torch.Generator().manual_seed(0)
    low = torch.rand((n, 3, max(2, h // 16), max(2, w // 16)), generator=g)
    return (torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear") * 255).to(torch.uint8)


def validate(emb: SessionEmbedder, sample: torch.Tensor | None) -> float:
    """Check ``emb`` against eager torch fp32 (once per cache entry and precision, on real images); returns the
    lowest cosine. Raises :class:`RuntimeUnavailableError` when an image is below :data:`TOLERANCES` of its
    precision."""
    bb = emb.backbone
    tolerance = TOLERANCES[emb.precision]
    recorded = emb.meta.get(emb.validation_key)
    if recorded is None:
        images = sample if sample is not None else synthetic_images(bb)
        reference = Embedder(bb, device="cpu", precision="fp32")(images)
        try:
            got = emb(images)
        except Exception as e:  # noqa: BLE001 - a runtime that cannot run the graph is refused like a wrong one
            raise RuntimeUnavailableError(f"{emb.runtime} cannot run the ONNX export of {bb.name} "
                                          f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
        low = float(np.nan_to_num(cosines(got, reference), nan=-1.0).min())
        recorded = {"min_cosine": round(low, 6), "images": len(images), "tolerance": tolerance,
                    "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if sample is not None:  # synthetic images are not the collection's: checked again on real ones
            emb.entry.record_validation(recorded, emb.validation_key)
    low = float(recorded["min_cosine"])
    if not low >= tolerance:
        raise RuntimeUnavailableError(
            f"{emb.runtime} refused for {bb.name}: its vectors reach a cosine of only {low:.5f} to eager torch fp32 "
            f"on {recorded['images']} images (at least {tolerance} per image is needed in {emb.precision}); recorded in "
            f"{emb.entry.file}, delete that folder to check again")
    emb.min_cosine = low
    return low


def exported_precision(runtime: str, precision: str) -> str:
    """What ``runtime`` computes in for ``precision``: ``"auto"`` is bf16 where the CPU has it (as for torch) if
    the runtime does bf16 (OpenVINO), else fp32."""
    if precision == "auto":
        precision = resolve_precision("auto", torch.device("cpu"))
    return precision if precision in RUNTIME_PRECISIONS[runtime] else "fp32"


def check_runtime(runtime: str, device: str, precision: str) -> None:
    """Refuse a runtime name, or an exported runtime with a GPU device, a torch-only precision, or not installed.

    An exported runtime runs on the CPU: with ``device="auto"`` too (a GPU, if any, is left unused)."""
    if runtime not in RUNTIMES:
        raise EmbedOptionError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r} (--runtime)")
    if runtime not in EXPORTED:
        return
    if str(device) not in ("auto", "cpu"):
        raise EmbedOptionError(f"runtime {runtime!r} runs on the CPU here, not on {device}: use --device cpu, "
                               "or --runtime torch (or auto) on a GPU")
    check_runtime_precision(runtime, precision)
    if runtime_version(runtime) is None:
        extra = ' or pip install "tl-embedstore[openvino]"' if runtime == "openvino" else ""
        raise EmbedOptionError(f"runtime {runtime!r} is not installed: pip install {runtime}{extra}, "
                               "or use --runtime torch (or auto)")


def load_embedder(backbone: Backbone, runtime: str = "auto", device: str = "auto", precision: str = "auto", *,
                  items: Sequence[ImageItem] | None = None, images: int | None = None, batch_size: int = 64,
                  max_bytes: int = MAX_FILE_BYTES) -> AnyEmbedder:
    """An embedder of ``backbone`` on ``runtime`` (see the module docstring for the rule of ``auto``).

    ``items``: images of the run, a few of which are decoded to validate an exported runtime and
    to time the candidates of ``auto`` (without them, seeded synthetic images are used and no
    validation is recorded); ``images``: how many the run embeds (``auto`` probes from
    :data:`AUTO_MIN_IMAGES`; None: as many as that). Every embedder has ``runtime`` (recorded in the
    space's lineage), ``min_cosine`` and ``notes`` (refusals and the probe, for the run summary).
    """
    check_runtime(runtime, device, precision)
    dev = resolve_device(device)
    sample: list[torch.Tensor | None] = []

    def real_sample() -> torch.Tensor | None:  # decoded once, when first needed
        if not sample:
            sample.append(sample_images(items, backbone, max_bytes=max_bytes) if items else None)
        return sample[0]

    def fallback(note: str) -> Embedder:
        emb = Embedder(backbone, "cpu", precision)
        emb.notes.append(f"{note}; embedding with {emb.runtime}")
        return emb

    if runtime in EXPORTED:
        try:
            emb = SessionEmbedder(backbone, runtime, precision=exported_precision(runtime, precision))
            validate(emb, real_sample())
            return emb
        except RuntimeUnavailableError as e:
            return fallback(str(e))
    if runtime == "torch" or dev.type != "cpu" or precision == "fp16":
        return Embedder(backbone, device, precision)
    return _auto_cpu(backbone, precision, images, batch_size, real_sample)


def _machine() -> dict[str, Any]:
    model = ""
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in have]
    except OSError:
        pass
    return {"cpu": model, "flags": flags, "threads": torch.get_num_threads()}


def probe_file(backbone: Backbone, precision: str, batch: int,
               exported: dict[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    """Where the probe of this machine and backbone is kept, and its key (``exported``: the precision of
    each exported runtime probed)."""
    key = {**_machine(), "backbone": backbone.name, "weights_sha256": backbone.weights_sha256,
           "input_size": list(backbone.data_config["input_size"]), "batch": batch, "torch": torch_version(),
           "torch_precision": precision, "runtimes": {r: runtime_version(r) for r in EXPORTED},
           "exported_precisions": exported or {}}
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode())[:16]
    return cache_root() / "runtimes" / f"probe-{digest}.json", key


def _auto_cpu(backbone: Backbone, precision: str, images: int | None, batch_size: int, real_sample: Any) -> AnyEmbedder:
    torch_emb = Embedder(backbone, "cpu", precision)
    batch = min(batch_size, PROBE_BATCH)
    # each exported runtime at the precision asked (auto: bf16 where the CPU has it and the runtime does it);
    # an explicit bf16 leaves out the runtimes that compute fp32 only
    exported = {r: exported_precision(r, precision) for r in EXPORTED
                if precision != "bf16" or "bf16" in RUNTIME_PRECISIONS[r]}
    path, key = probe_file(backbone, torch_emb.precision, batch, exported)
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) and known.get("key") == key else None
    except (OSError, ValueError):
        known = None
    if known is not None:
        chosen = known.get("chosen")
        note = f"auto: {chosen} (probe of {known.get('created')}: {_rates(known.get('images_per_s', {}))})"
        if chosen in exported:
            try:
                emb = SessionEmbedder(backbone, chosen, precision=exported[chosen])
                validate(emb, real_sample())
                emb.notes.append(note)
                return emb
            except RuntimeUnavailableError as e:
                torch_emb.notes.append(f"{e}; embedding with {torch_emb.runtime}")
                return torch_emb
        torch_emb.notes.append(note)
        return torch_emb
    if images is not None and images < AUTO_MIN_IMAGES:
        torch_emb.notes.append(f"auto: {torch_emb.runtime} (exported runtimes are probed for runs of "
                               f"{AUTO_MIN_IMAGES} images or more; this one has {images})")
        return torch_emb
    candidates: dict[str, AnyEmbedder] = {"torch": torch_emb}
    notes = []
    for name, name_precision in exported.items():
        if runtime_version(name) is None:
            continue
        try:
            emb = SessionEmbedder(backbone, name, precision=name_precision)
            validate(emb, real_sample())
            candidates[name] = emb
        except RuntimeUnavailableError as e:
            notes.append(str(e))
    if len(candidates) == 1:  # nothing to time against
        torch_emb.notes.extend(notes + [f"auto: {torch_emb.runtime} (no exported runtime is usable)"])
        return torch_emb
    rates = time_candidates(candidates, real_sample(), batch)
    chosen = max(rates, key=lambda k: rates[k] / (1.0 if k == "torch" else MIN_GAIN))
    record = {"key": key, "images_per_s": {candidates[k].runtime: round(v, 1) for k, v in rates.items()},
              "chosen": chosen, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = candidates[chosen]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
    except OSError as e:
        notes.append(f"the probe cannot be kept in {path.parent} ({e.strerror or e}): the next run probes again")
    out.notes.extend(notes + [f"auto: {chosen} (probe: {_rates(record['images_per_s'])})"])
    return out


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{k} {v} img/s" for k, v in sorted(rates.items(), key=lambda kv: -kv[1]))


def time_candidates(candidates: dict[str, AnyEmbedder], sample: torch.Tensor | None, batch: int) -> dict[str, float]:
    """Images per second of each embedder on ``batch`` images (``sample`` repeated): one warm-up and
    :data:`PROBE_ROUNDS` timed batches each, alternating; the best round counts (other processes
    only ever slow a round down)."""
    first = next(iter(candidates.values()))
    base = sample if sample is not None else synthetic_images(first.backbone)
    x = base.repeat((batch + len(base) - 1) // len(base), 1, 1, 1)[:batch].contiguous()
    best = {k: float("inf") for k in candidates}
    for round_ in range(PROBE_ROUNDS + 1):
        for k, emb in candidates.items():
            t0 = time.perf_counter()
            emb(x)
            if round_:
                best[k] = min(best[k], time.perf_counter() - t0)
    return {k: batch / t for k, t in best.items()}
