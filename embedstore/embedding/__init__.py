"""Images (and texts) to vectors: the batched, device-aware forward pass of a backbone, its scikit-learn
transformer, and the text tower of CLIP backbones (``text``).

Imports torch. Crash safety: computes in memory; this stage writes nothing (the pipeline stores the vectors).
"""
from __future__ import annotations

from .embedder import AUTOCAST_DTYPES, Embedder, iter_embeddings, embed_items, cpu_has_bf16, resolve_device, resolve_precision, default_workers, tune_allocator
from .transformer import EmbeddingTransformer
from .text import embed_texts, encode_texts, has_text_tower

__all__ = ['AUTOCAST_DTYPES', 'Embedder', 'iter_embeddings', 'embed_items', 'cpu_has_bf16', 'resolve_device', 'resolve_precision', 'default_workers', 'tune_allocator', 'EmbeddingTransformer', 'embed_texts', 'encode_texts', 'has_text_tower']
