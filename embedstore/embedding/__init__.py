"""Images (and texts) to vectors: the batched, device-aware forward pass of a backbone, its scikit-learn
transformer, the exported runtimes (``runtimes``: ONNX Runtime, OpenVINO, and the ``auto`` rule), and
the text tower of CLIP backbones (``text``).

Imports torch. Crash safety: computes in memory; this stage writes no store (the pipeline stores the vectors),
only its cache of exported models and probes, atomically (``onnx``, ``runtimes``).
"""
from __future__ import annotations

from .embedder import AUTOCAST_DTYPES, Embedder, iter_embeddings, embed_items, cpu_has_bf16, resolve_device, resolve_precision, default_workers, tune_allocator
from .runtimes import load_embedder
from .onnx import SessionEmbedder
from .transformer import EmbeddingTransformer
from .text import embed_texts, encode_texts, has_text_tower

__all__ = ['AUTOCAST_DTYPES', 'Embedder', 'iter_embeddings', 'embed_items', 'cpu_has_bf16', 'resolve_device', 'resolve_precision', 'default_workers', 'tune_allocator', 'load_embedder', 'SessionEmbedder', 'EmbeddingTransformer', 'embed_texts', 'encode_texts', 'has_text_tower']
