"""embedstore: embed image collections once with frozen pretrained backbones, reuse them forever.

The sub-packages follow the data flow::

    data -> backbones -> embedding -> pipeline -> store -> index -> search -> heads -> finetuning -> report

Every name below works after a plain ``import embedstore``; each is imported on first use, so
``import embedstore`` (and ``embedstore info``) stay fast. The sub-packages themselves are
attributes too (``embedstore.search.search``, ``embedstore.index.build_index``).
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import BackboneError, CollectionError, EmbedstoreError, HeadError, IndexFileError, StoreError, StoreLockedError

__version__ = "0.1.0"
DEFAULT_BACKBONE = "efficientnet_lite0"

SUBPACKAGES = ("data", "backbones", "embedding", "pipeline", "store", "index", "search", "heads", "finetuning",
               "report", "demo", "choices", "errors")

_LAZY = {  # public name -> the sub-package that defines it
    "discover": "data",
    "Backbone": "backbones",
    "list_backbones": "backbones",
    "load_backbone": "backbones",
    "Embedder": "embedding",
    "EmbeddingTransformer": "embedding",
    "embed": "pipeline",
    "merge": "pipeline",
    "Space": "store",
    "Store": "store",
    "open_store": "store",
    "build_index": "index",
    "load_index": "index",
    "duplicates": "search",
    "classify": "heads",
    "fit_head": "heads",
    "ClassifyReport": "heads",
    "FaissKNNClassifier": "heads",
    "Head": "heads",
    "load_head": "heads",
    "save_head": "heads",
    "predict_images": "heads",
    "finetune": "finetuning",
    "write_report": "report",
}

__all__ = [
    "DEFAULT_BACKBONE",
    "BackboneError",
    "CollectionError",
    "EmbedstoreError",
    "HeadError",
    "IndexFileError",
    "StoreError",
    "StoreLockedError",
    *_LAZY,
    *SUBPACKAGES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'embedstore' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
