"""embedstore: embed image collections once with frozen pretrained backbones, reuse them forever.

Data flow, as the modules read: backbones -> data -> embedding -> pipeline -> store.
Names are imported lazily, so ``import embedstore`` (and ``embedstore info``) stay fast. The
stage functions named like their modules live there: ``embedstore.classify.classify``.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import BackboneError, CollectionError, EmbedstoreError, StoreError, StoreLockedError

__version__ = "0.1.0"
DEFAULT_BACKBONE = "efficientnet_lite0"

_LAZY = {
    "Backbone": "backbones",
    "list_backbones": "backbones",
    "load_backbone": "backbones",
    "discover": "data",
    "Embedder": "embedding",
    "iter_embeddings": "embedding",
    "embed": "pipeline",
    "Space": "store",
    "Store": "store",
    "open_store": "store",
    "EmbeddingTransformer": "transformer",
    "build_index": "index",
    "load_index": "index",
    "duplicates": "search",
    "fit_head": "classify",
    "ClassifyReport": "classify",
    "FaissKNNClassifier": "classify",
    "Head": "heads",
    "HeadError": "heads",
    "load_head": "heads",
    "save_head": "heads",
    "predict_images": "heads",
    "write_report": "report",
}

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneError",
    "CollectionError",
    "EmbedstoreError",
    "StoreError",
    "StoreLockedError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'embedstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
