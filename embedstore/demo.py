"""A built-in real example that needs no download: scikit-learn's digits and sample photos.

Crash safety: each image is written atomically (``_atomic.atomic_write``: temporary file, fsync,
rename), so a killed ``embedstore demo`` leaves whole images only, and a rerun writes the missing ones.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ._atomic import atomic_write


def write_digits(folder: str | os.PathLike, per_class: int = 100, size: int = 64, seed: int = 0) -> Path:
    """Render scikit-learn's 8x8 handwritten digits as PNG files in ``train/`` and ``val/`` folders.

    80% of each class goes to train, 20% to val. Existing files are left as they are.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(folder)
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = rng.permutation(idx)[:per_class]
        n_train = int(round(len(idx) * 0.8))
        for k, i in enumerate(idx):
            split = "train" if k < n_train else "val"
            out = root / split / str(label) / f"digit_{i:04d}.png"
            if out.exists():
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            pixels = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white paper
            image = Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC)
            atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))
    return root


def write_sample_photos(folder: str | os.PathLike) -> list[Path]:
    """Save the two photos that scikit-learn ships (china.jpg, flower.jpg) as JPEG files."""
    from sklearn.datasets import load_sample_image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("china.jpg", "flower.jpg"):
        out = root / name
        if not out.exists():
            photo = Image.fromarray(load_sample_image(name))
            atomic_write(out, lambda tmp: photo.save(tmp, format="JPEG", quality=95))
        paths.append(out)
    return paths


def imagenet_top(paths: list[Path], backbone: str, k: int = 3) -> list[dict[str, Any]]:
    """Label photos with the backbone's own ImageNet classifier (shows the weights are real)."""
    import torch
    from timm.data import ImageNetInfo

    from .backbones.load import load_backbone
    from .data.collection import ImageItem
    from .embedding.embedder import Embedder, embed_items

    embedder = Embedder(load_backbone(backbone, classifier=True), device="auto")
    logits, _ = embed_items([ImageItem(str(p), p.name) for p in paths], embedder, workers=0)
    info = ImageNetInfo()
    probs = torch.from_numpy(logits).softmax(-1)
    top = probs.topk(k)
    return [
        {
            "image": p.name,
            "top": [
                {"label": info.index_to_description(int(i)), "p": round(float(v), 3)}
                for v, i in zip(top.values[n], top.indices[n])
            ],
        }
        for n, p in enumerate(paths)
    ]


def compare_heads(store_path: str | os.PathLike,
                  models: Sequence[str] = ("logreg", "knn", "centroid")) -> list[dict[str, Any]]:
    """Compare classifier heads on the cached vectors (train split -> val split)."""
    from .heads.compare import classify

    report = classify(store_path, models=list(models))
    return [
        {k: r[k] for k in ("model", "accuracy", "balanced_accuracy", "fit_s", "params")} for r in report.results
    ]


def nearest_neighbours(store_path: str | os.PathLike, k: int = 5) -> dict[str, Any]:
    """Search the store with its first val image: the neighbours should share its label."""
    from .search.query import search
    from .store import open_store

    with open_store(store_path) as st:
        sp = st.space()
        codes, names = sp.codes("split")  # an int32 per vector, not a string column
        first_val = int(np.flatnonzero(codes == names.index("val"))[0])
        row, query = int(sp.rows[first_val]), str(sp.column("path", [first_val])[0])
    hits = search(store_path, rows=[row], k=k, exclude_self=True)["results"][0]
    return {"query": query, "hits": hits}
