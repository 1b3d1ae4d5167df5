"""JPEGs decoded as one batch on the model's device (issue 19: nvjpeg on a GPU), checked on the CPU here.

On the CPU, ``decoder="device"`` runs the same code as on CUDA (encoded JPEGs shipped by the reader,
the batched ``decode_jpeg`` call, the EXIF orientation applied as tensor ops, the transform replayed,
the fallback for refused files), so its pixels must equal ``decoder="torchvision"``'s exactly: that
path decodes with libjpeg-turbo too and applies the orientation inside torchvision. A CUDA-only test
runs where a GPU is present.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from imagegen import TINY_BACKBONE
from test_decode import encode, photo, tiny_transform
from embedstore.data import ImageItem, ImageReader
from embedstore.data.decode import Decoder, Encoded
from embedstore.data.device_decode import collate_encoded, finish_batch, use_device_decode

CPU = torch.device("cpu")


def _files(tmp_path: Path) -> dict[str, bytes]:
    files = {f"exif-{o}.jpg": encode(photo(150 + 10 * o, 100 + 7 * o, o), orientation=o) for o in range(1, 9)}
    files.update({
        "large.jpg": encode(photo(1200, 800, 11)),  # "auto" leaves it to Pillow's draft mode; "device" decodes it
        "grayscale.jpg": encode(photo(200, 150, 13, "L")),
        "png.png": encode(photo(180, 120, 15), "PNG"),
        "truncated.jpg": encode(photo(240, 180, 16))[:3000],
        "text.jpg": b"not an image",
    })
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def test_device_path_equals_the_torchvision_path_with_every_exif_orientation(tmp_path: Path):
    files = _files(tmp_path)
    items = [ImageItem(str(tmp_path / n), n) for n in files]
    tf = tiny_transform()
    device_reader, ref_reader = ImageReader(items, tf, 160, decoder="device"), ImageReader(items, tf, 160, decoder="torchvision")
    results, batch = collate_encoded([device_reader[i] for i in range(len(items))])
    assert batch is not None
    encoded = {items[r.index].rel: x for r, x in zip([r for r in results if not r.error], batch)}
    assert {n for n, x in encoded.items() if isinstance(x, Encoded)} == {
        *(f"exif-{o}.jpg" for o in range(1, 9)), "large.jpg", "truncated.jpg"}  # Pillow's header accepts it
    assert [encoded[f"exif-{o}.jpg"].orientation for o in range(1, 9)] == list(range(1, 9))
    out = finish_batch(results, batch, device_reader.decode, CPU)
    ref = [ref_reader[i] for i in range(len(items))]
    assert [(r.error, r.message) for r in results] == [(r.error, r.message) for r in ref]  # same failures recorded
    assert results[list(files).index("truncated.jpg")].error == "OSError"  # refused by both decoders: Pillow's error
    expected = torch.stack([r.pixels for r in ref if r.pixels is not None])
    assert out is not None and out.dtype == torch.uint8 and torch.equal(out, expected)


def test_a_batch_of_only_failures_or_only_other_formats(tmp_path: Path):
    tf = tiny_transform()
    dec = Decoder(tf, 160, "device")
    bad = Encoded(torch.frombuffer(bytearray(encode(photo(64, 48))[:400]), dtype=torch.uint8), 1)

    class R:  # the reader's result fields finish_batch reads and sets
        error = message = ""

    results = [R()]
    assert finish_batch(results, [bad], dec, CPU) is None and results[0].error
    png = dec(encode(photo(90, 60), "PNG"))
    assert isinstance(png, torch.Tensor)  # decoded in the worker, as before
    assert torch.equal(finish_batch([R()], [png], dec, CPU)[0], png)
    assert finish_batch([], None, dec, CPU) is None


def test_embedding_with_device_decode_equals_the_worker_path(tmp_path: Path):
    from embedstore import load_backbone
    from embedstore.embedding import Embedder, iter_embeddings

    files = _files(tmp_path)
    items = [ImageItem(str(tmp_path / n), n) for n in files]
    embedder = Embedder(load_backbone(TINY_BACKBONE, weights="random"), device="cpu", precision="fp32")
    assert not use_device_decode(embedder.device)  # on a CPU, auto decodes in the workers

    def run(decoder: str) -> tuple[list[str], np.ndarray]:
        failed, vectors = [], []
        for results, v in iter_embeddings(items, embedder, batch_size=4, workers=1, decoder=decoder):
            failed += [items[r.index].rel for r in results if r.error]
            vectors.append(v)
        return failed, np.concatenate(vectors)

    failed_device, v_device = run("device")
    failed_ref, v_ref = run("torchvision")
    assert failed_device == failed_ref == ["truncated.jpg", "text.jpg"]
    np.testing.assert_array_equal(v_device, v_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvjpeg)")
def test_nvjpeg_pixels_are_close_to_the_cpu_path(tmp_path: Path):  # pragma: no cover - GPU machines only
    files = _files(tmp_path)
    items = [ImageItem(str(tmp_path / n), n) for n in files]
    tf = tiny_transform()
    reader = ImageReader(items, tf, 160, decoder="device")
    results, batch = collate_encoded([reader[i] for i in range(len(items))])
    gpu = finish_batch(results, batch, reader.decode, torch.device("cuda"))
    cpu = torch.stack([r.pixels for r in (ImageReader(items, tf, 160, decoder="torchvision")[i]
                                          for i in range(len(items))) if r.pixels is not None])
    diff = (gpu.cpu().int() - cpu.int()).abs()
    assert gpu.device.type == "cuda" and diff.float().mean() < 2.0, float(diff.float().mean())
