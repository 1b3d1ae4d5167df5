"""Exported runtimes: a backbone exported once to ONNX and run by ONNX Runtime (fp32) or OpenVINO (fp32 or bf16), on the CPU.

The exported graph takes the reader's uint8 NCHW batch (dynamic batch axis), folds the mean/std
normalisation in and ends with the backbone's own pooling (what ``Backbone.model`` returns), so a
:class:`SessionEmbedder` keeps :class:`~.embedder.Embedder`'s call contract: uint8 batch in,
float32 ``(n, dim)`` out.

The cache (:func:`cache_root`: ``$EMBEDSTORE_CACHE``, else ``$XDG_CACHE_HOME/embedstore``, else
``~/.cache/embedstore``; under ``runtimes/``) holds one folder per (backbone name, weights SHA-256,
input size, runtime and its version, opset, torch version): ``model.onnx`` and ``entry.json`` (the
key, the model file's SHA-256, an export error, and per precision the validation against eager
torch fp32 that :mod:`.runtimes` records). OpenVINO reads the ONNX file itself (compiling takes well under a
second, so no compiled form is kept).

Crash safety: ``model.onnx`` and then ``entry.json`` are written through :mod:`embedstore._atomic`;
``entry.json`` names the model's SHA-256, so a kill between the two, a truncated, corrupt or
swapped model file reads as a missing entry and is exported again (never loaded). Processes
exporting the same entry take turns under a file lock. No store is written here.
"""
from __future__ import annotations

import io
import json
import os
import queue
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._atomic import atomic_write_bytes, atomic_write_text
from .._hashing import sha256_bytes, sha256_file
from ..backbones.load import Backbone
from ..choices import RUNTIME_PRECISIONS
from ..errors import RuntimeUnavailableError

OPSET = 18
EXPORTED = ("onnxruntime", "openvino")  # the runtimes that run the exported graph
CACHE_ENV = "EMBEDSTORE_CACHE"
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # runtime -> distribution
# OpenVINO: one single-threaded stream per core (see Streams), in the precision asked (OpenVINO's own default
# would be bf16 on AMX CPUs whatever was asked); threads not pinned to cores, which the decode workers share
# (embed on 2 cores: 143 vs 129 img/s pinned)
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": False}
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # embedstore's precision names -> OpenVINO's


def cache_root() -> Path:
    """``$EMBEDSTORE_CACHE``, else ``$XDG_CACHE_HOME/embedstore``, else ``~/.cache/embedstore``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "embedstore"


def runtime_version(runtime: str) -> str | None:
    """The installed version of ``onnxruntime`` or ``openvino``; None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in (PACKAGES[runtime], f"{PACKAGES[runtime]}-gpu", f"{PACKAGES[runtime]}-openvino"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def torch_version() -> str:
    return torch.__version__.split("+")[0]


class Normalised(torch.nn.Module):
    """uint8 NCHW -> (x - mean) / std -> the backbone (with its pooling): the graph that is exported."""

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x.float() - self.mean) / self.std).float()


def export_onnx(backbone: Backbone) -> tuple[bytes, str]:
    """The backbone as one ONNX model (bytes) and the exporter used: torch's dynamo exporter, else the
    TorchScript one. Raises :class:`RuntimeUnavailableError` when neither can export it (a model over
    protobuf's 2 GB limit included: torch embeds it)."""
    model = backbone.model
    device = next(iter(model.parameters()), torch.empty(0)).device
    net = Normalised(model.cpu().float(), backbone.data_config["mean"], backbone.data_config["std"]).eval()
    h, w = backbone.data_config["input_size"][1:]
    example = (torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8),)
    errors = []
    try:
        for dynamo in (True, False):
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    if dynamo:
                        program = torch.onnx.export(
                            net, example, None, input_names=["images"], output_names=["vectors"], opset_version=OPSET,
                            dynamo=True, verbose=False, external_data=False,
                            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
                        return program.model_proto.SerializeToString(), "torch.onnx dynamo"
                    buf = io.BytesIO()
                    torch.onnx.export(net, example, buf, input_names=["images"], output_names=["vectors"],
                                      opset_version=OPSET, dynamo=False,
                                      dynamic_axes={"images": {0: "batch"}, "vectors": {0: "batch"}})
                    return buf.getvalue(), "torch.onnx torchscript"
            except Exception as e:  # noqa: BLE001 - an exporter's failure is a reason to fall back, named below
                errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}")
    finally:
        model.to(device)
    raise RuntimeUnavailableError(f"{backbone.name} cannot be exported to ONNX ({'; '.join(errors)})")


class CacheEntry:
    """One folder of the runtime cache: ``model.onnx`` and ``entry.json`` for one key."""

    def __init__(self, backbone: Backbone, runtime: str, root: Path | None = None) -> None:
        version = runtime_version(runtime)
        if version is None:
            raise RuntimeUnavailableError(f"{runtime} is not installed: pip install {PACKAGES[runtime]}")
        self.runtime, self.version = runtime, version
        self.key = {"backbone": backbone.name, "weights_sha256": backbone.weights_sha256,
                    "input_size": list(backbone.data_config["input_size"]), "runtime": runtime,
                    "runtime_version": version, "opset": OPSET, "torch": torch_version()}
        digest = sha256_bytes(json.dumps(self.key, sort_keys=True).encode())[:16]
        slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in backbone.name)[:60]
        self.folder = (root or cache_root() / "runtimes") / f"{slug}-{runtime}-{digest}"
        self.model, self.file = self.folder / "model.onnx", self.folder / "entry.json"

    @property
    def label(self) -> str:
        """``"onnxruntime 1.18.0"``: what the space's lineage records."""
        return f"{self.runtime} {self.version}"

    def read(self) -> dict[str, Any] | None:
        """The entry's record, or None when it is missing, unreadable or of another key."""
        try:
            meta = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("key") == self.key else None

    def write(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.file, json.dumps({**meta, "key": self.key}, indent=1, sort_keys=True))

    def model_ok(self, meta: dict[str, Any]) -> bool:
        """The model file is there and is the one the entry was written for."""
        try:
            return bool(meta.get("model_sha256")) and sha256_file(self.model) == meta["model_sha256"]
        except OSError:
            return False

    def export(self, backbone: Backbone) -> dict[str, Any]:
        """Export the model (or record why it cannot be) and return the new record."""
        t0 = time.perf_counter()
        try:
            data, exporter = export_onnx(backbone)
        except RuntimeUnavailableError as e:  # recorded: later runs do not try again (a new torch version does)
            meta = {"export_error": str(e), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self.write(meta)
            return meta
        atomic_write_bytes(self.model, data)
        meta = {"model_sha256": sha256_bytes(data), "exporter": exporter, "bytes": len(data),
                "export_seconds": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.write(meta)
        return meta

    def record_validation(self, validation: dict[str, Any], key: str = "validation") -> None:
        """Keep the validation with the entry, under ``key`` (one per precision; a cache that cannot be
        written is checked again next time)."""
        meta = self.read()
        if meta is not None:
            try:
                self.write({**meta, key: validation})
            except OSError:
                pass


def open_session(entry: CacheEntry, backbone: Backbone, threads: int,
                 precision: str = "fp32") -> tuple[Streams, str, dict[str, Any]]:
    """The runtime's session over the cached model (exported first when missing or damaged), the precision it
    computes in, and the entry's record.

    A model file that the runtime cannot load is exported again once. Raises
    :class:`RuntimeUnavailableError` when the backbone cannot be exported or loaded."""
    try:
        return _open_session(entry, backbone, threads, precision)
    except OSError as e:  # a cache that cannot be written (read-only home, full disk): torch embeds instead
        raise RuntimeUnavailableError(f"the runtime cache {entry.folder} cannot be used ({e.strerror or e}): set "
                                      f"{CACHE_ENV} to a writable folder") from None


def _open_session(entry: CacheEntry, backbone: Backbone, threads: int,
                  precision: str) -> tuple[Streams, str, dict[str, Any]]:
    from filelock import FileLock

    entry.folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.folder / ".lock")):
        meta = entry.read()
        exported = False
        if meta is None or ("export_error" not in meta and not entry.model_ok(meta)):
            meta, exported = entry.export(backbone), True
        if "export_error" in meta:
            raise RuntimeUnavailableError(f"{meta['export_error']} (recorded in {entry.file}; delete it to try again)")
        try:
            return (*_session(entry, threads, precision), meta)
        except Exception as e:  # noqa: BLE001 - a file the runtime cannot read is exported again
            if exported:
                raise RuntimeUnavailableError(f"{entry.label} cannot load the ONNX export of {backbone.name} "
                                              f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
            entry.model.unlink(missing_ok=True)
            meta = entry.export(backbone)
            if "export_error" in meta:
                raise RuntimeUnavailableError(meta["export_error"]) from None
            return (*_session(entry, threads, precision), meta)


class Streams:
    """``streams`` single-threaded runs of one compiled model side by side, fed in order.

    A batch is split into ``streams`` parts queued on a pool of as many threads, so the parts of the
    next batch start as soon as a thread is free: no core waits at the end of a batch for the part
    that a decode worker slowed down. Measured on 2 cores (Xeon with AMX, efficientnet_lite0, batch
    64, imagenette, decoding in 1 worker, no store): ONNX Runtime 193.3 vs 179.7 img/s with each batch
    awaited before the next; OpenVINO bf16 398.0 vs 375.6. Whole batches per thread instead of parts
    were slower (model alone 214.6 vs 234.8 img/s: two 64-image working sets).
    """

    def __init__(self, run_part: Callable[[np.ndarray], np.ndarray], streams: int) -> None:
        self.run_part, self.streams = run_part, max(1, streams)
        self.pool = ThreadPoolExecutor(self.streams, thread_name_prefix="embedstore-stream")

    def submit(self, x: np.ndarray) -> "Joined":
        parts = [p for p in np.array_split(x, self.streams) if len(p)] if self.streams > 1 else [x]
        return Joined([self.pool.submit(self.run_part, p) for p in parts])


class Joined:
    """The pending parts of one batch: ``result()`` waits for them and joins their rows in order."""

    def __init__(self, parts: list[Future]) -> None:
        self.parts = parts

    def result(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.result(), dtype=np.float32) for p in self.parts])


def _session(entry: CacheEntry, threads: int, precision: str = "fp32") -> tuple[Streams, str]:
    """The compiled model as :class:`Streams` (one per thread) and the precision it computes in."""
    path = str(entry.model)
    streams = max(1, threads)
    if entry.runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1  # one core per stream
        options.log_severity_level = 3  # errors only
        # idle threads sleep instead of spinning: the decode workers share the cores (embed: 142 vs 134 img/s)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])  # safe from several threads
        name = session.get_inputs()[0].name
        return Streams(lambda x: session.run(None, {name: x})[0], streams), "fp32"
    import openvino as ov

    def compile_model() -> tuple[Any, queue.SimpleQueue]:
        core = ov.Core()
        config = {**OPENVINO_CONFIG, "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
                  "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": streams}
        compiled = core.compile_model(core.read_model(path), "CPU", config)
        free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(streams):  # one request per stream: only the Streams pool's threads run them
            free.put(compiled.create_infer_request())
        return compiled, free

    # Compiled on a thread of its own: OpenVINO's CPU plugin installs a signal stack on the compiling thread
    # and puts back the one it found when the model is freed, even if that one was freed meanwhile. With
    # models compiled on this thread and freed out of order, the next signal (a decode worker's exit)
    # lands on freed memory: the process dies of SIGSEGV (tests/test_runtimes.py reproduces it).
    with ThreadPoolExecutor(1, thread_name_prefix="embedstore-compile") as once:
        compiled, free = once.submit(compile_model).result()
    used = openvino_precision(compiled) or precision  # bf16 asked of a CPU without it: fp32

    # Requests meeting a new input shape at the same time deadlocked (both stuck in OpenVINO's input
    # dispatch, 1 run in 4 of tests/test_runtimes.py; the cure OpenVINO users report: reshape serially).
    # A request whose input shape changes runs that call under a lock; same-shape calls run side by side.
    reshaping = threading.Lock()
    last_shape: dict[int, tuple[int, ...]] = {}

    def run(x: np.ndarray) -> np.ndarray:
        request = free.get()
        try:
            if last_shape.get(id(request)) == x.shape:
                return np.array(request.infer({0: x})[0], dtype=np.float32, copy=True)
            with reshaping:
                last_shape[id(request)] = x.shape
                return np.array(request.infer({0: x})[0], dtype=np.float32, copy=True)
        finally:
            free.put(request)
    return Streams(run, streams), used


def openvino_precision(compiled: Any) -> str | None:
    """The precision an OpenVINO compiled model computes in (``"fp32"``, ``"bf16"``), or None when unknown."""
    try:
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: its name is "f32", "bf16", ...
    except RuntimeError:
        return None
    name = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    return {v: k for k, v in OPENVINO_PRECISIONS.items()}.get(name)


class SessionEmbedder:
    """An :class:`~.embedder.Embedder` variant running the exported graph on the CPU: same contract, uint8
    batch in, float32 ``(n, dim)`` out, and ``submit`` to queue a batch behind the running one.

    ``precision``: ``"fp32"``, or ``"bf16"`` for OpenVINO (which then computes in bf16 where the CPU has
    it, and records ``"fp32"`` where it has not); ONNX Runtime runs fp32 only.
    """

    def __init__(self, backbone: Backbone, runtime: str, threads: int | None = None,
                 root: Path | None = None, precision: str = "fp32") -> None:
        if precision not in RUNTIME_PRECISIONS[runtime]:
            raise RuntimeUnavailableError(f"{runtime} computes in {' or '.join(RUNTIME_PRECISIONS[runtime])} here, "
                                          f"not {precision}")
        self.backbone = backbone
        self.device = torch.device("cpu")
        self.entry = CacheEntry(backbone, runtime, root)
        self.threads = threads or torch.get_num_threads()
        self.session, self.precision, self.meta = open_session(self.entry, backbone, self.threads, precision)
        self.runtime = self.entry.label + ("" if self.precision == "fp32" else f" {self.precision}")
        self.min_cosine: float | None = None  # set by the validation (runtimes.validate)
        self.notes: list[str] = []

    @property
    def validation_key(self) -> str:
        """Where the cache entry keeps this precision's validation."""
        return "validation" if self.precision == "fp32" else f"validation_{self.precision}"

    def submit(self, batch: torch.Tensor | np.ndarray) -> Joined:
        """Queue ``batch``; ``.result()`` of the returned object gives its vectors (batches run in order)."""
        x = np.ascontiguousarray(batch.numpy() if isinstance(batch, torch.Tensor) else batch, dtype=np.uint8)
        return self.session.submit(x)

    def __call__(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.submit(batch).result()
