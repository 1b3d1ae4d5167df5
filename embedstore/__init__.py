"""embedstore: embed image collections once with frozen pretrained backbones, reuse them forever.

Data flow, as the modules read: backbones -> data -> embedding -> pipeline (store writer) -> store.
"""
from .backbones import DEFAULT_BACKBONE, Backbone, BackboneError, list_backbones, load_backbone
from .data import CollectionError, discover
from .embedding import Embedder, iter_embeddings
from .pipeline import embed
from .store import Space, Store, StoreError, StoreLockedError, open_store
from .transformer import EmbeddingTransformer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "BackboneError",
    "CollectionError",
    "Embedder",
    "EmbeddingTransformer",
    "Space",
    "Store",
    "StoreError",
    "StoreLockedError",
    "discover",
    "embed",
    "iter_embeddings",
    "list_backbones",
    "load_backbone",
    "open_store",
]
