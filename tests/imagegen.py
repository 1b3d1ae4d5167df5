"""Generated image classes for tests: coloured shapes on noisy backgrounds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
TINY_BACKBONE = "test_efficientnet"  # timm's tiny test network, randomly initialised (seeded)

# Classes that differ in colour and shape, so even untrained features separate them.
CLASS_STYLES = {
    "red_disc": ((200, 40, 40), "ellipse"),
    "green_square": ((40, 180, 60), "rectangle"),
    "blue_stripes": ((40, 60, 200), "stripes"),
}


def draw_image(style: str, seed: int, size: int = 96) -> Image.Image:
    """One generated image of a class: a coloured shape on a noisy light background."""
    rng = np.random.default_rng(seed)
    color, shape = CLASS_STYLES[style]
    bg = (rng.normal(220, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(bg)
    d = ImageDraw.Draw(im)
    jitter = lambda: int(rng.integers(-8, 9))  # noqa: E731
    c = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in color)
    a, b = size // 4 + jitter(), 3 * size // 4 + jitter()
    if shape == "ellipse":
        d.ellipse([a, a, b, b], fill=c)
    elif shape == "rectangle":
        d.rectangle([a, a, b, b], fill=c)
    else:
        for y in range(0, size, 12):
            d.rectangle([0, y + jitter() % 4, size, y + 5], fill=c)
    return im


def make_collection(root: Path, per_class: int = 6, splits: tuple[str, ...] = ("train", "val"),
                    fmt: str = "png", seed: int = 0) -> Path:
    """Write ``root/<split>/<class>/img.<fmt>`` (or ``root/<class>/img`` with splits=())."""
    n = 0
    for split in splits or ("",):
        for style in CLASS_STYLES:
            folder = root / split / style if split else root / style
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw_image(style, seed * 100_000 + n).save(folder / f"{style}_{i:03d}.{fmt}")
                n += 1
    return root
