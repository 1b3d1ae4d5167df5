"""Similarity queries over a space: k nearest neighbours of images, rows or paths, and near-duplicate groups.

Crash safety: reads the store and its index only; writes nothing.
"""
from __future__ import annotations

from .rows import parse_where, WHERE_KEYS
from .query import search, duplicates, DUPLICATES_THRESHOLD

__all__ = ['parse_where', 'WHERE_KEYS', 'search', 'duplicates', 'DUPLICATES_THRESHOLD']
