"""One self-contained HTML page about a store, rendered from Jinja2 templates.

Crash safety: the store is only read; the page is replaced atomically (see :mod:`.page`).
"""
from __future__ import annotations

from .thumbs import data_uri, thumbnail_jpeg, placeholder_jpeg
from .page import write_report, STAGES, project

__all__ = ['data_uri', 'thumbnail_jpeg', 'placeholder_jpeg', 'write_report', 'STAGES', 'project']
