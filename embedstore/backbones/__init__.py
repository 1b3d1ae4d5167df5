"""Frozen pretrained networks: the registry of offline backbones and loading any timm/torchvision name or local
weights, and CLIP models through open_clip (``open_clip:ARCH``, with a text tower; :mod:`.openclip`).

The registry table (names, dims, input sizes) is plain data; the loaders import torch and timm when first used.
Crash safety: this stage only reads (weights files, timm's cache); it writes nothing of its own.
"""
from __future__ import annotations

from .._lazy import lazy_exports
from .registry import (RANDOM, REGISTRY, RegistryEntry, default_space_name, has_backbone, has_text_tower, list_backbones,
                       offline_names)

_LOAD = ("Backbone", "load_backbone", "load_space_backbone", "weights_checksum", "weights_arg")
__getattr__, __dir__ = lazy_exports(__name__, {name: ".load" for name in _LOAD})

__all__ = ["RANDOM", "REGISTRY", "RegistryEntry", "default_space_name", "has_backbone", "has_text_tower", "list_backbones",
           "offline_names", *_LOAD]
