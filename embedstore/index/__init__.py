"""FAISS indexes over a space: choose the factory, build, tune recall, and keep the files crash-safe."""
from __future__ import annotations

from .build import build_index, load_index, index_vectors, index_files, LoadedIndex, choose_factory, resolve_kind, kind_name, exact_knn, normalized, omp_threads, recall_at_k, tune, IndexFileError

__all__ = ['build_index', 'load_index', 'index_vectors', 'index_files', 'LoadedIndex', 'choose_factory', 'resolve_kind', 'kind_name', 'exact_knn', 'normalized', 'omp_threads', 'recall_at_k', 'tune', 'IndexFileError']
