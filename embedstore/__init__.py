"""embedstore: embed image collections once with frozen pretrained backbones, reuse them forever.

The sub-packages follow the data flow::

    data -> backbones -> embedding -> pipeline -> store -> index -> search -> heads -> curation -> finetuning -> report
                                                                      -> serve

Every name below works after a plain ``import embedstore``; each is imported on first use, so
``import embedstore`` (and ``embedstore info``) stay fast. The sub-packages themselves are
attributes too (``embedstore.search.search``, ``embedstore.index.build_index``).
Crash safety: importing writes nothing; each stage's modules state their own rule.
"""
from __future__ import annotations

from ._lazy import lazy_exports
from .errors import BackboneError, CollectionError, EmbedstoreError, HeadError, IndexFileError, StoreError, StoreLockedError

__version__ = "0.1.0"
DEFAULT_BACKBONE = "efficientnet_lite0"

SUBPACKAGES = ("data", "backbones", "embedding", "pipeline", "store", "index", "search", "heads", "curation",
               "finetuning", "report", "serve", "demo", "choices", "errors")

_LAZY = {  # public name -> the sub-package that defines it
    "discover": "data",
    "Backbone": "backbones",
    "list_backbones": "backbones",
    "load_backbone": "backbones",
    "Embedder": "embedding",
    "EmbeddingTransformer": "embedding",
    "embed": "pipeline",
    "merge": "pipeline",
    "add_vectors": "pipeline",
    "import_vectors": "pipeline",
    "export_vectors": "pipeline",
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
    "audit": "curation",
    "finetune": "finetuning",
    "write_report": "report",
    "Client": "serve",
    "create_app": "serve",
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


__getattr__ = lazy_exports(__name__, {**{name: f".{pkg}" for name, pkg in _LAZY.items()},
                                      **{pkg: f".{pkg}" for pkg in SUBPACKAGES}})[0]


def __dir__() -> list[str]:
    return sorted(__all__)
