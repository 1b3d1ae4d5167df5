"""JPEG batches decoded on the model's device: nvjpeg on a CUDA GPU (``decoder="device"``).

With ``Decoder(..., decoder="device")`` the reader's worker processes still read, hash and check
every file (Pillow's header: the decompression-bomb check, format, mode, EXIF orientation), decode
every file that is not an 8-bit colour JPEG as before, and ship those JPEGs still encoded
(:class:`Encoded`: the bytes and the EXIF orientation). :func:`collate_encoded` batches the two
kinds without stacking; :func:`finish_batch`, in the main process, decodes the encoded ones in one
``torchvision.io.decode_jpeg(list, device=...)`` call (nvjpeg, batched, on CUDA), applies the EXIF
orientation there (torchvision applies it on the CPU only), replays the model's eval transform on
the device (:func:`.decode.tensor_transform`) and stacks the batch on the device.

A JPEG the device decoder refuses is decoded by the CPU path (:class:`.decode.Decoder`, ``"auto"``:
libjpeg-turbo or the Pillow reference) and, when that raises too, becomes the result's error, so
the run records it as a failure like any unreadable file. Pixels: on the CPU this path gives
exactly ``decoder="torchvision"``'s pixels (tested); on CUDA, nvjpeg's IDCT and the GPU's float
resize may differ from libjpeg-turbo and Pillow by a level or two (not measured here: no GPU was
lent to the session that wrote this; ``benchmarks/gpu_check.sh`` measures it).

The embedding loop picks this path by itself on a CUDA device (:func:`use_device_decode`); on a
CPU it is slower than decoding in the worker processes (the main process would decode), so there
it is used only when asked for, and by the tests.

Crash safety: decodes in memory only; writes nothing.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

from .decode import Decoder, Encoded


def _rot(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.rot90(x, k, (-2, -1))


# EXIF orientation -> the CHW tensor operation Pillow's ImageOps.exif_transpose makes of it
ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda x: x.flip(-1),  # mirror left-right
    3: lambda x: x.flip(-2, -1),  # rotate 180
    4: lambda x: x.flip(-2),  # mirror top-bottom
    5: lambda x: x.transpose(-2, -1),  # transpose
    6: _rot(-1),  # rotate 90 clockwise (Pillow's ROTATE_270)
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),  # transverse
    8: _rot(1),  # rotate 90 counter-clockwise (Pillow's ROTATE_90)
}


def use_device_decode(device: torch.device) -> bool:
    """Whether the embedding loop decodes JPEGs on ``device``: a CUDA device whose torchvision has nvjpeg."""
    if device.type != "cuda":
        return False
    try:
        return hasattr(torch.ops.image, "decode_jpegs_cuda")
    except (AttributeError, RuntimeError):
        return False


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Pixels as they are meant to be seen: the EXIF orientation applied to a CHW tensor (on any device)."""
    op = ORIENT.get(orientation)
    return op(x).contiguous() if op is not None else x


def collate_encoded(results: list[Any]) -> tuple[list[Any], list[torch.Tensor | Encoded] | None]:
    """The ``decoder="device"`` batch: the results, and the pixels or :class:`Encoded` of those without error."""
    good = [r.pixels for r in results if r.pixels is not None]
    for r in results:
        r.pixels = None
    return results, (good or None)


def _device_decode(encoded: Sequence[Encoded], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 CHW tensors on ``device`` (oriented); None for each JPEG the device decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [e.data for e in encoded]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 points to torchcodec; nvjpeg's batch notes
        try:
            decoded: list[torch.Tensor | None] = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole batched call: decode one by one
            decoded = []
            for d in datas:
                try:
                    decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
    return [orient(x, e.orientation) if x is not None else None for x, e in zip(decoded, encoded)]


def finish_batch(results: list[Any], batch: list[torch.Tensor | Encoded] | None, decoder: Decoder,
                 device: torch.device) -> torch.Tensor | None:
    """The batch as one uint8 NCHW tensor on ``device``: :class:`Encoded` JPEGs decoded there.

    ``batch`` lines up with the results without error (as :func:`collate_encoded` made it). A JPEG
    neither the device nor the CPU decoder can decode sets its result's ``error``/``message`` and
    leaves the batch, so the rows of the returned tensor line up with the results still without error.
    """
    if batch is None:
        return None
    todo = [i for i, x in enumerate(batch) if isinstance(x, Encoded)]
    decoded = _device_decode([batch[i] for i in todo], device) if todo else []  # type: ignore[misc]
    pixels: list[torch.Tensor | None] = [x if not isinstance(x, Encoded) else None for x in batch]
    transform = decoder.tensor_transform
    good = [r for r in results if not r.error]  # lines up with batch
    for i, x in zip(todo, decoded):
        enc = batch[i]
        assert isinstance(enc, Encoded)
        if x is not None and transform is not None:
            pixels[i] = transform(x).contiguous()
            continue
        try:  # the CPU path: libjpeg-turbo or Pillow, which decodes it or raises what the reference raises
            pixels[i] = Decoder(decoder.transform, decoder.min_size, "auto")(enc.data.numpy().tobytes())
        except Exception as e:  # noqa: BLE001 - a bad file is data, not a crash
            pixels[i] = None
            good[i].error, good[i].message = type(e).__name__, str(e)[:500] or type(e).__name__
    kept = [p.to(device, non_blocking=True) for p in pixels if p is not None]
    return torch.stack(kept) if kept else None
