"""Exceptions of the library; each message names the file or value at fault and the fix.

Every class here subclasses :class:`EmbedstoreError` (tests/test_errors.py checks it), so the CLI shows
any of them as one ``Error: ...`` line; other exceptions are bugs and keep their traceback.
Crash safety: definitions only; nothing is written.
"""


class EmbedstoreError(RuntimeError):
    """Base class of embedstore's errors."""


class StoreError(EmbedstoreError):
    """A store cannot be read or written."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class IndexFileError(StoreError):
    """An index file is missing, corrupt or stale; the message names the file and the fix."""


class SidecarError(IndexFileError):
    """An index sidecar is unreadable or inconsistent: the space has no usable index."""


class BackboneError(EmbedstoreError):
    """A backbone cannot be created or its weights cannot be loaded."""


class CollectionError(EmbedstoreError, ValueError):
    """The collection (folder or CSV list) cannot be read."""


class InvalidNameError(EmbedstoreError, ValueError):
    """A name (e.g. an embedding space) that would not be one safe file-name / HDF5 path component."""


class RefusedFileError(CollectionError):
    """The reader refuses a listed file before decoding it (recorded as a failure; the run goes on)."""


class NotRegularFileError(RefusedFileError):
    """A FIFO, device, socket or folder where an image file was expected."""


class FileTooLargeError(RefusedFileError):
    """A file larger than the reader's byte limit (``max_bytes`` / ``--max-file-size``)."""


class OutsideRootError(RefusedFileError):
    """A symlink in a folder collection that leads outside the collection's root."""


class QueryError(EmbedstoreError, ValueError):
    """A search or duplicates request cannot be answered as given (k, a filter, a threshold)."""


class NotFoundError(QueryError, LookupError):
    """A row, stored path, space or head a query names that is not there (a server answers 404)."""


class HeadError(EmbedstoreError, ValueError):
    """A classifier head cannot be saved, loaded or applied; the message names the file and the fix."""


class IndexBuildError(EmbedstoreError, ValueError):
    """An index cannot be built as asked (kind, memory budget, target recall, device, too few vectors)."""


class EmbedOptionError(EmbedstoreError, ValueError):
    """``embed`` options that cannot be used (or combined) as given; the message names the option and the fix."""


class RuntimeUnavailableError(EmbedstoreError):
    """An inference runtime (onnxruntime, openvino) cannot export, load or reproduce a backbone; ``embed``
    falls back to torch and shows this message as a note of the run."""


class ShardError(EmbedOptionError):
    """A shard (``(i, n)`` / ``--shard I/N``) or a set of shard files to merge that cannot be used as given."""


class EngineError(EmbedstoreError):
    """The Ray engine cannot run (Ray missing or unreachable, too few GPUs) or some of its shards failed."""


class FinetuneError(EmbedstoreError, ValueError):
    """A fine-tune run cannot start or resume as asked (a setting, the store's splits, a checkpoint)."""


class SizeError(EmbedstoreError, ValueError):
    """A size (bytes, or e.g. ``"64M"``, ``"4G"``) that cannot be read; the message names the text and the form."""


class EmptyFileError(RefusedFileError):
    """A listed image file of 0 bytes (recorded as a failure; the run goes on)."""


class DownloadError(RefusedFileError):
    """A URL that could not be fetched for good (HTTP 404/403, a missing object): recorded as a failure,
    not tried again by a rerun."""


class TransientDownloadError(DownloadError):
    """A URL that could not be fetched after retries (timeout, connection error, HTTP 5xx/429, a
    response cut short): recorded as a failure, tried again by the next run."""


class TarShardError(RefusedFileError):
    """A tar shard or one of its members the reader refuses (compressed, damaged, changed since it was
    listed, an unreadable label file): recorded as a failure; the run goes on."""


class ReportError(EmbedstoreError, ValueError):
    """A report cannot be written as asked (a sample size, k, a threshold, the heads to compare)."""


class MissingShardFileError(StoreError, FileNotFoundError):
    """A shard file listed for a merge does not exist."""


class MissingImageError(CollectionError, FileNotFoundError):
    """An image file or folder given to search or predict does not exist (``filename`` names it), or none was given."""

    def __init__(self, message: str, filename: str | None = None) -> None:
        super().__init__(message)
        self.errno, self.filename = 2, filename  # ENOENT

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 2] ...: 'file'"
        return str(self.args[0])


class ImportFormatError(EmbedstoreError, ValueError):
    """Vectors to import (a clip-retrieval folder: img_emb/, metadata/; or arrays in hand) that cannot be read
    as given; the message names the file or value and the fix."""


class ExportError(EmbedstoreError, ValueError):
    """A space cannot be exported as asked (an output folder that holds parts already, a part size); the
    message names the folder or value and the fix."""


class ServeError(QueryError):
    """A request a search server refuses; ``status`` is the HTTP status it answers with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class UploadError(ServeError):
    """An uploaded file that is not an image the server can use (the message says why)."""

    status = 422


class UploadTooLargeError(UploadError):
    """An upload or request body over the server's byte limit (``--max-upload``)."""

    status = 413


class MediaError(ServeError):
    """A row's image a server cannot send: not in the store (404), outside the collection root (403)."""

    status = 404


class ServerError(EmbedstoreError):
    """A server refused a client's request (``status`` and its message) or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status
