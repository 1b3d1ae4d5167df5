"""Exceptions of the library; each message names the file or value at fault and the fix."""


class EmbedstoreError(RuntimeError):
    """Base class of embedstore's errors."""


class StoreError(EmbedstoreError):
    """A store cannot be read or written."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class BackboneError(EmbedstoreError):
    """A backbone cannot be created or its weights cannot be loaded."""


class CollectionError(EmbedstoreError, ValueError):
    """The collection (folder or CSV list) cannot be read."""
