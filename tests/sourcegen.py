"""Input sources for tests, all offline: a local HTTP server of generated images (some slow, missing,
cut short, too large or flaky), webdataset tar shards written here, and Hugging Face datasets."""
from __future__ import annotations

import io
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from imagegen import CLASS_STYLES, draw_image

STYLES = list(CLASS_STYLES)


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    draw_image(STYLES[i % 3], i).save(buf, fmt)
    return buf.getvalue()


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 (port 0). Paths: ``/img/N.jpg`` and ``/img/N.png`` (image N),
    ``/missing.jpg`` (404), ``/slow.jpg`` (answers after ``slow_s``), ``/cut.jpg`` (announces the whole
    image, sends half, closes), ``/big.png`` (over 200 kB), ``/corrupt.jpg`` (a truncated JPEG, whole),
    ``/flaky.jpg`` (503 on the first request, then the image). ``hits`` counts requests per path."""

    def __init__(self, slow_s: float = 3.0):
        self.hits: Counter[str] = Counter()
        self.slow_s = slow_s
        self._lock = threading.Lock()
        big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8))
        buf = io.BytesIO()
        big.save(buf, "PNG")
        self.big = buf.getvalue()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.hits[self.path] += 1
                    hits = server.hits[self.path]
                try:
                    server.answer(self, self.path.split("?")[0], hits)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:  # a client that timed out: expected
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, h: BaseHTTPRequestHandler, path: str, hits: int) -> None:
        def send(status: int, body: bytes, length: int | None = None, ctype: str = "image/jpeg") -> None:
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(body) if length is None else length))
            h.end_headers()
            h.wfile.write(body)
            h.wfile.flush()

        if path.startswith("/img/"):
            stem, ext = path[5:].rsplit(".", 1)
            return send(200, image_bytes(int(stem), "PNG" if ext == "png" else "JPEG"))
        if path == "/slow.jpg":
            time.sleep(self.slow_s)
            return send(200, image_bytes(0))
        if path == "/cut.jpg":
            data = image_bytes(1)
            send(200, data[: len(data) // 2], length=len(data))
            h.close_connection = True
            return None
        if path == "/big.png":
            return send(200, self.big, ctype="image/png")
        if path == "/corrupt.jpg":
            return send(200, image_bytes(2)[:300])
        if path == "/flaky.jpg" and hits == 1:
            return send(503, b"busy", ctype="text/plain")
        if path == "/flaky.jpg":
            return send(200, image_bytes(3))
        return send(404, b"not found", ctype="text/plain")

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def add_member(tf: tarfile.TarFile, name: str, data: bytes, mtime: int = 1_700_000_000) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), mtime
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, first: int, n: int, *, label: str = "cls", changed: dict[int, bytes] | None = None,
                mtimes: dict[int, int] | None = None) -> Path:
    """A webdataset shard of images ``first..first+n-1`` (``KEY.jpg`` + ``KEY.cls`` with the class name, or
    ``KEY.json`` with ``{"label": ...}``); ``changed`` replaces an image's bytes, ``mtimes`` a member's mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i in range(first, first + n):
            key = f"sample{i:05d}"
            data = (changed or {}).get(i, image_bytes(i))
            add_member(tf, f"{key}.jpg", data, (mtimes or {}).get(i, 1_700_000_000))
            name = STYLES[i % 3]
            if label == "cls":
                add_member(tf, f"{key}.cls", name.encode())
            else:
                add_member(tf, f"{key}.json", f'{{"label": "{name}", "id": {i}}}'.encode())
    return path


def hf_dataset(n: int, seed: int = 0):
    """A ``datasets.Dataset`` of n generated PIL images with a ClassLabel column and an id column."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=STYLES),
                                  "id": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [draw_image(STYLES[i % 3], seed * 1000 + i) for i in range(n)],
                                       "label": [i % 3 for i in range(n)],
                                       "id": [f"img-{i:04d}" for i in range(n)]}, features=features)


def members(path: Path) -> Iterator[str]:
    with tarfile.open(path) as tf:
        yield from tf.getnames()
