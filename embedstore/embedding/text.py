"""Texts to vectors: a CLIP backbone's text tower puts text queries and class prompts into its image space.

Only spaces embedded with an ``open_clip:`` backbone have a text tower (their attributes say
``text_tower: True``). :func:`encode_texts` uses a backbone already loaded (a server keeps one),
:func:`embed_texts` loads a space's backbone first, refusing it when the weights differ from the
checksum the space recorded (the text tower is in that checksum).

Crash safety: computes in memory; nothing here writes a file.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._vectors import l2_normalize
from ..backbones.registry import has_text_tower
from ..errors import QueryError

__all__ = ["check_text_space", "embed_texts", "encode_texts", "has_text_tower"]


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise QueryError(f"texts takes a list of strings such as ['a photo of a cat'], not the string {texts!r}")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
    if not texts or bad:
        raise QueryError(f"text queries must be non-empty strings, got {bad[0]!r}" if bad
                         else "no text query given: pass at least one text, e.g. ['a photo of a cat']")
    return texts


def encode_texts(backbone: Any, texts: Sequence[str], device: str | None = None) -> np.ndarray:
    """L2-normalised float32 (len(texts), dim) embeddings of ``texts`` by a loaded backbone's text tower.

    Args:
        backbone: a :class:`~embedstore.backbones.Backbone` of an ``open_clip:`` name.
        texts: the texts (truncated to the tokenizer's context, 77 tokens for CLIP).
        device: ``None`` to run where the backbone's model is now (e.g. where an ``Embedder`` put
            it); else ``"auto"``, ``"cpu"``, ``"cuda"``..., where the model is moved first.
    """
    tower = getattr(backbone, "extra", {}).get("text_tower")
    if tower is None:
        raise QueryError(f"backbone {getattr(backbone, 'name', backbone)!r} has no text tower: text queries need an "
                         "open_clip: backbone, e.g. load_backbone('open_clip:ViT-B-32', weights='laion2b_s34b_b79k')")
    texts = _check_texts(texts)
    if device is not None:
        from .embedder import resolve_device

        backbone.model.to(resolve_device(device))
    return l2_normalize(tower.encode(texts))


def check_text_space(space: Any) -> None:
    """QueryError naming the fix when ``space`` (a store's ``Space``) has no text tower."""
    if has_text_tower(space.attrs):
        return
    made = (f"holds vectors imported from {space.attrs['imported_from']}" if "imported_from" in space.attrs
            else f"was embedded with {space.attrs.get('backbone')!r}, which has no text tower")
    raise QueryError(f"space {space.name!r} {made}: text queries need a space embedded with an open_clip: backbone, "
                     "e.g. `embedstore embed PHOTOS --backbone open_clip:ViT-B-32 --weights laion2b_s34b_b79k` "
                     "(weights from the local Hugging Face cache); query this one with images, rows or paths")


def embed_texts(space: Any, texts: Sequence[str], device: str = "auto") -> np.ndarray:
    """L2-normalised float32 embeddings of ``texts`` in ``space``: its backbone is loaded (weights
    checksum checked, ``BackboneError`` when they differ) and its text tower encodes them.

    A space without a text tower raises ``QueryError`` naming the fix (embed with an ``open_clip:`` backbone).
    """
    check_text_space(space)
    texts = _check_texts(texts)
    from ..backbones.load import load_space_backbone

    return encode_texts(load_space_backbone(space.attrs), texts, device=device)
