"""Exceptions of the library; each message names the file or value at fault and the fix."""


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


class HeadError(EmbedstoreError, ValueError):
    """A classifier head cannot be saved, loaded or applied; the message names the file and the fix."""
