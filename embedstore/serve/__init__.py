"""A long-running search service over one store: a JSON API, a web page, and a Python client.

Modules: ``state`` (the store snapshot, indexes and backbones a server keeps loaded, following
the store as ``embed`` adds rows), ``embed`` (uploads decoded safely, concurrent image queries
batched through the backbone), ``media`` (row images and thumbnails, from inside the collection
root only), ``models`` (typed requests and responses), ``api`` (the routes), ``app``
(``create_app``: limits, token, errors as 4xx), ``client`` (``Client``: the same queries over HTTP,
importing neither torch nor faiss) and ``static/`` (the page).

Crash safety: a server never writes the store; see ``state`` for the index files it may update.
"""
from __future__ import annotations

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"Client": ".client", "ServerError": ".client",
                                               "create_app": ".app", "ServedStore": ".state",
                                               "ServeOptions": ".state"})

__all__ = ["Client", "ServerError", "create_app", "ServedStore", "ServeOptions"]
