"""Query images and texts embedded by a server: decoding uploads safely, and batching concurrent
queries into one forward pass of the space's backbone.

An upload is decoded and preprocessed in the request's own thread by the collection reader's
``data.decode.Decoder`` (so a stored file gets its stored pixels; decompression bombs and truncated
files are refused). The
tensors then go to one ``MicroBatcher`` per backbone: a thread that takes the first query
waiting and every other query already queued behind it (up to ``max_batch``), runs them as one
batch, and hands each request its row. An idle server adds no wait to a lone query; under load,
the queries that arrive while a batch runs form the next one.

Crash safety: nothing here writes a file.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import numpy as np

from .._vectors import l2_normalize
from ..errors import UploadError


class MicroBatcher:
    """Runs ``fn`` on stacked inputs from many threads at once, as few batches as the load allows."""

    def __init__(self, fn: Callable[[Any], np.ndarray], max_batch: int = 32, name: str = "embedstore-batcher") -> None:
        self.fn, self.max_batch = fn, max(1, int(max_batch))
        self._queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self.batches = 0  # forward passes run (the benchmark reports queries per pass)
        self.items = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __call__(self, x: Any, timeout: float | None = 120.0) -> np.ndarray:
        """The output row of one input; waits for the batch it joins."""
        fut: Future = Future()
        self._queue.put((x, fut))
        return fut.result(timeout=timeout)

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        import torch

        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                out = self.fn(torch.stack([x for x, _ in batch]))
                self.batches, self.items = self.batches + 1, self.items + len(batch)
                for (_, fut), row in zip(batch, out):
                    fut.set_result(row)
            except BaseException as e:  # noqa: BLE001 - every waiting request gets the error, the thread lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)


class QueryModel:
    """A space's backbone, loaded once (weights checked against the space's checksum), embedding
    uploaded images through a :class:`MicroBatcher` and texts where the space has a text tower."""

    def __init__(self, attrs: dict[str, Any], device: str = "auto", max_batch: int = 32) -> None:
        from ..backbones.load import load_space_backbone
        from ..data.decode import Decoder
        from ..data.reader import draft_size
        from ..embedding.embedder import Embedder

        self.backbone = load_space_backbone(attrs)  # BackboneError when the weights here differ
        self.embedder = Embedder(self.backbone, device=device)
        # the collection reader's own decoding, so an upload of a stored file gets the stored pixels
        self.decode = Decoder(self.backbone.eval_transform(), draft_size(self.backbone.data_config))
        self.batcher = MicroBatcher(self.embedder, max_batch, name=f"embedstore-batcher-{self.backbone.name}")
        self._text_lock = threading.Lock()

    def prepare(self, data: bytes, what: str = "the upload") -> Any:
        """Decode and preprocess image bytes to the backbone's uint8 input tensor (UploadError if they are
        not a usable image)."""
        from PIL import Image

        if not data:
            raise UploadError(f"{what} is empty: send the bytes of a JPEG, PNG, WebP, BMP or TIFF image")
        try:
            return self.decode(data)
        except Image.DecompressionBombError as e:
            raise UploadError(f"{what} was refused: {e}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise UploadError(f"{what} is not an image that can be read ({e}): send a JPEG, PNG, WebP, BMP or "
                              "TIFF file that opens in an image viewer") from None

    def embed_images(self, blobs: Sequence[bytes], names: Sequence[str] | None = None,
                     normalize: bool = True) -> np.ndarray:
        """Vectors of image bytes (L2-normalised unless ``normalize=False``: a head takes the raw
        vectors it was trained on), each through the shared batcher."""
        names = names or [f"upload {i}" for i in range(len(blobs))]
        tensors = [self.prepare(b, n) for b, n in zip(blobs, names)]
        out = np.stack([self.batcher(t) for t in tensors]).astype(np.float32)
        return l2_normalize(out) if normalize else out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised vectors of texts by the space's text tower, where the image side runs."""
        from ..embedding.text import encode_texts

        with self._text_lock:
            return encode_texts(self.backbone, list(texts))

    def close(self) -> None:
        self.batcher.close()
