"""The confusion-matrix picture of ``embedstore classify`` (PNG; matplotlib when installed, else Pillow).

Crash safety: the picture is drawn in memory and saved to one path given by the caller; a crash
leaves at worst a partial picture there, which the next run overwrites. Nothing else is written.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def write_confusion_png(path: str, matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "") -> str:
    """Draw a confusion matrix (rows: true, columns: predicted) to a PNG file.

    Uses scikit-learn's ``ConfusionMatrixDisplay`` when matplotlib is installed, else Pillow.
    """
    cm = np.asarray(matrix, dtype=np.int64)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import ConfusionMatrixDisplay
    except ImportError:
        _confusion_pillow(path, cm, [str(x) for x in labels], title)
        return path
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(4, 0.6 * n + 2)))
    display = ConfusionMatrixDisplay(cm, display_labels=list(labels))
    display.plot(ax=ax, cmap="Blues", xticks_rotation=45, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _confusion_pillow(path: str, cm: np.ndarray, labels: list[str], title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n, cell = len(labels), 44
    names = [lab if len(lab) <= 18 else lab[:17] + "…" for lab in labels]
    left = 16 + 7 * max(len(s) for s in names)
    top = 40 + 7 * max(len(s) for s in names)
    im = Image.new("RGB", (left + n * cell + 20, top + n * cell + 40), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 8), title, fill="black", font=font)
    peak = max(int(cm.max()), 1)
    for i in range(n):
        d.text((8, top + i * cell + cell // 2 - 5), names[i], fill="black", font=font)
        column = Image.new("RGB", (7 * len(names[i]) + 4, 14), "white")
        ImageDraw.Draw(column).text((2, 1), names[i], fill="black", font=font)
        im.paste(column.rotate(90, expand=True), (left + i * cell + cell // 2 - 7, top - 8 - column.width))
        for j in range(n):
            v = int(cm[i, j])
            shade = int(255 - 200 * v / peak)
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1]
            d.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
            d.text((box[0] + cell // 2 - 3 * len(str(v)), box[1] + cell // 2 - 5), str(v),
                   fill="white" if shade < 128 else "black", font=font)
    d.text((left, top + n * cell + 12), "rows: true label, columns: predicted", fill="black", font=font)
    im.save(path)
