"""Similarity queries over a space: k nearest neighbours of images, rows, paths or vectors, and
near-duplicate groups from the space's k-NN graph.

Modules: ``query`` (``search``), ``rows`` (filters, path lookups, a query's own rows), ``duplicates``
and ``graph`` (the cached, resumable k-NN graph). An index's candidates are re-ranked from the
stored vectors by ``index.rerank`` (``search_index``).

Crash safety: reads the store and its index; the only files written are the k-NN graph cache of
``duplicates`` (each batch atomically, see :mod:`.graph`), beside the index.
"""
from __future__ import annotations

from .rows import parse_where, WHERE_KEYS
from .query import search
from .duplicates import duplicates, knn_graph, DUPLICATES_THRESHOLD

__all__ = ["parse_where", "WHERE_KEYS", "search", "duplicates", "knn_graph", "DUPLICATES_THRESHOLD"]
