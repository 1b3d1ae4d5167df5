"""A tiny CLIP for tests, registered with open_clip under the name ``TinyTestCLIP``.

``register_tiny_clip()`` adds ``TinyTestCLIP.json`` (beside this file) to open_clip's model configs
once per process and returns the embedstore backbone name, ``open_clip:TinyTestCLIP``; use it with
``weights="random"`` (seeded): a ViT of 2 layers, width 64, patch 16 on 64-pixel images, a text
transformer of 2 layers, width 64, 16 tokens, and 32-dimensional embeddings, built in milliseconds.
open_clip's own BPE vocabulary (shipped in its package) tokenizes, so nothing is downloaded.
``embed_tiny_clip(folder)`` builds a small store of that space (a few seconds).
"""
from __future__ import annotations

from pathlib import Path

TINY_CLIP_ARCH = "TinyTestCLIP"
TINY_CLIP = f"open_clip:{TINY_CLIP_ARCH}"
TINY_CLIP_DIM = 32
CONFIG = Path(__file__).with_name(f"{TINY_CLIP_ARCH}.json")


def register_tiny_clip() -> str:
    """Register the tiny config with open_clip (idempotent) and return ``open_clip:TinyTestCLIP``."""
    import open_clip

    if TINY_CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG)
    return TINY_CLIP


def embed_tiny_clip(folder: Path) -> tuple[Path, Path]:
    """(collection, store): ``imagegen.make_collection`` (train/val, 3 classes) in ``folder/images``,
    embedded with the tiny CLIP (random weights) into ``folder/clip.h5`` (space ``TinyTestCLIP-random``)."""
    import embedstore
    from imagegen import make_collection

    name = register_tiny_clip()
    images = make_collection(Path(folder) / "images")
    store = Path(folder) / "clip.h5"
    embedstore.embed(images, store, backbone=name, weights="random", workers=0, progress=False)
    return images, store
