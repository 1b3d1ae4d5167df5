"""FAISS indexes over a space: choose the factory, build, tune recall, and keep the files crash-safe.

Crash safety: every index file is published atomically, a new generation switched in by its
sidecar (:mod:`.files`); a killed build leaves the previous index whole and in use.
"""
from __future__ import annotations

from ..errors import IndexFileError
from .budget import process_rss
from .build import build_index, index_vectors
from .choose import KINDS, choose_factory, kind_name, resolve_kind
from .files import LoadedIndex, index_files, index_is_current, load_index
from .rerank import search_index
from .tune import omp_threads, recall_at_k, tune
from .ondisk import build_ivf_on_disk, search_ivf_on_disk
from .vectors import exact_knn, normalized

__all__ = ['build_index', 'load_index', 'index_vectors', 'index_files', 'LoadedIndex', 'choose_factory',
           'resolve_kind', 'kind_name', 'exact_knn', 'normalized', 'omp_threads', 'recall_at_k', 'tune',
           'IndexFileError', 'KINDS', 'build_ivf_on_disk', 'search_ivf_on_disk', 'index_is_current', 'search_index',
           'process_rss']
