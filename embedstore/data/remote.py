"""Image bytes from URLs: ``http(s)://`` through httpx, every other scheme through fsspec.

:class:`Fetch` is the byte source of URL items (see :class:`.collection.ByteSource`): a download
streams at most ``max_bytes`` (the Content-Length is checked first), each read waits at most
``timeout`` seconds and a whole download at most ``10 * timeout``; timeouts, connection errors,
truncated responses, HTTP 5xx, 408 and 429 are retried ``retries`` times with exponential backoff
and then raise :class:`TransientDownloadError`; other HTTP errors (404, 403, ...) and missing
objects raise :class:`DownloadError` at once. The reader records either as the item's failure and
the run goes on; a rerun fetches again only the URLs whose failure was transient
(:data:`RETRIED_ERRORS`). A batch's URLs are fetched ``concurrency`` at a time, on threads
(:meth:`Fetch.read_many`, called by the reader's ``__getitems__``), in each decode worker.

fsspec filesystems other than the built-in ones need their package (``s3fs`` for ``s3://``,
``gcsfs`` for ``gs://``): :func:`check_scheme` refuses a scheme whose package is missing while the
collection is listed, before anything is written.

Crash safety: reads only; nothing is written (downloads stay in memory).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..errors import CollectionError, DownloadError, EmbedOptionError, FileTooLargeError, TransientDownloadError
from .items import ByteSource, ImageItem

RETRIED_ERRORS = ("TransientDownloadError",)  # failures a rerun tries again (network trouble, not a 404)
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "hf": "huggingface_hub", "ssh": "paramiko", "sftp": "paramiko"}
USER_AGENT = "embedstore (tl-embedstore)"


def file_url_path(url: str) -> str:
    """The local path of a ``file://`` URL (percent-escapes decoded)."""
    return url2pathname(urlparse(url).path)


def check_scheme(scheme: str, where: str) -> None:
    """Refuse (CollectionError) a URL scheme that no installed fsspec filesystem reads."""
    if scheme in ("http", "https"):
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        package = PACKAGES.get(scheme, "the filesystem's package")
        raise CollectionError(f"{where}: {scheme}:// URLs need {package}, which is not installed ({e}): "
                              f"pip install {package}") from None
    except ValueError:
        raise CollectionError(f"{where}: {scheme}:// is not a URL scheme fsspec knows: use http(s)://, file://, "
                              "or a scheme of an installed fsspec filesystem (s3://, gs://, ...)") from None


@dataclass(frozen=True)
class Fetch(ByteSource):
    """How URLs are downloaded: ``timeout`` seconds per read (and ``10 * timeout`` per download),
    ``retries`` more attempts after a transient failure (backoff ``backoff * 2**attempt`` seconds), and
    ``concurrency`` downloads at a time per decode worker."""

    timeout: float = 30.0
    retries: int = 2
    concurrency: int = 16
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if not self.timeout > 0 or self.retries < 0 or self.concurrency < 1 or self.backoff < 0:
            raise EmbedOptionError(f"{self!r}: timeout must be > 0 seconds, retries >= 0, concurrency >= 1 "
                                   "(--url-timeout, --url-retries, --url-concurrency)")

    def read(self, item: ImageItem, max_bytes: int) -> bytes:
        got = self.read_many([item], max_bytes)[0]
        if isinstance(got, Exception):
            raise got
        return got

    def read_many(self, items: Sequence[ImageItem], max_bytes: int) -> list[bytes | Exception]:
        client = None
        if any(it.path.lower().startswith(("http://", "https://")) for it in items):
            import httpx

            client = httpx.Client(timeout=self.timeout, follow_redirects=True, headers={"User-Agent": USER_AGENT},
                                  limits=httpx.Limits(max_connections=self.concurrency))

        def one(it: ImageItem) -> bytes | Exception:
            try:
                return self._with_retries(it.path, max_bytes, client)
            except Exception as e:  # noqa: BLE001 - returned as data, recorded by the reader
                return e

        try:
            if len(items) == 1:
                return [one(items[0])]
            with ThreadPoolExecutor(min(self.concurrency, len(items)), thread_name_prefix="embedstore-fetch") as pool:
                return list(pool.map(one, items))
        finally:
            if client is not None:
                client.close()

    def _with_retries(self, url: str, max_bytes: int, client: Any) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                if client is not None and url.lower().startswith(("http://", "https://")):
                    return _http_get(client, url, max_bytes, self.timeout)
                return _fsspec_get(url, max_bytes)
            except TransientDownloadError as e:
                if attempt == self.retries:
                    raise TransientDownloadError(f"{e} (after {attempt + 1} attempts; retried on the next run)") from None
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")


def _http_get(client: Any, url: str, max_bytes: int, timeout: float) -> bytes:
    import httpx

    deadline = time.monotonic() + 10 * timeout
    try:
        with client.stream("GET", url) as r:
            if r.status_code >= 400:
                msg = f"HTTP {r.status_code} {r.reason_phrase} for {url}"
                if r.status_code in (408, 425, 429) or r.status_code >= 500:
                    raise TransientDownloadError(msg)
                raise DownloadError(msg)
            length = r.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise FileTooLargeError(f"refused: {url} is {length} bytes (Content-Length), over the limit of "
                                        f"{max_bytes} bytes (raise it with --max-file-size / max_bytes)")
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise FileTooLargeError(f"refused: {url} sent more than the limit of {max_bytes} bytes "
                                            "(raise it with --max-file-size / max_bytes)")
                if time.monotonic() > deadline:
                    raise TransientDownloadError(f"{url} took longer than {10 * timeout:g} s to download")
            return bytes(buf)
    except httpx.TimeoutException as e:
        raise TransientDownloadError(f"{url}: no answer within {timeout:g} s ({type(e).__name__})") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.TooManyRedirects) as e:
        raise DownloadError(f"{url}: {e}") from None
    except httpx.TransportError as e:  # connection refused or reset, a response cut short
        raise TransientDownloadError(f"{url}: {type(e).__name__}: {e}") from None


def _fsspec_get(url: str, max_bytes: int) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            size = getattr(f, "size", None)
            if isinstance(size, int) and size > max_bytes:
                raise FileTooLargeError(f"refused: {url} is {size} bytes, over the limit of {max_bytes} bytes "
                                        "(raise it with --max-file-size / max_bytes)")
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise DownloadError(f"{url}: {type(e).__name__}: {e}") from None
    except ImportError as e:
        raise DownloadError(f"{url}: {e}") from None
    except (TimeoutError, ConnectionError, OSError) as e:
        raise TransientDownloadError(f"{url}: {type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise FileTooLargeError(f"refused: {url} is larger than the limit of {max_bytes} bytes "
                                "(raise it with --max-file-size / max_bytes)")
    return data
