"""The fine-tune stage's data: train and val rows from a store's splits, and the linear probe that starts the head (LP-FT).

Crash safety: reads the store's cached vectors and computes in memory; nothing is written.

Only the split's rows are read: their positions come from the space's label and split codes, their
paths from ``Space.column`` at those positions, their vectors chunk by chunk
(:func:`embedstore.heads.rows.read_vectors`), so memory follows the split, not the collection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from ..errors import FinetuneError
from ..heads.rows import labelled_rows, read_vectors
from ..store import Space, Store


@dataclass
class SplitRows:
    """Rows of one part (train or val) of a space: positions in the space, with path, label and split.

    Iterating gives ``(path, label, split)`` tuples; ``len()`` is the number of rows.
    """

    positions: np.ndarray  # int64 positions in the space
    paths: np.ndarray
    labels: np.ndarray
    splits: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        return zip((str(p) for p in self.paths), (str(x) for x in self.labels), (str(x) for x in self.splits))

    def take(self, keep: np.ndarray) -> "SplitRows":
        """These rows at ``keep`` (a boolean mask or indices), in that order."""
        return SplitRows(self.positions[keep], self.paths[keep], self.labels[keep], self.splits[keep])


def split_rows(st: Store, sp: Space, seed: int) -> tuple[list[str], SplitRows, SplitRows, str]:
    """(classes, train rows, val rows, where val came from), each part in position order."""
    lab = labelled_rows(sp)
    rows = SplitRows(lab.positions, np.asarray(sp.column("path", lab.positions), dtype=object), lab.labels, lab.splits)
    train = rows.take(rows.splits == "train")
    if not len(train):
        raise FinetuneError(
            f"{st.path} has no labelled images in a 'train' split (space {sp.name!r}): fine-tuning needs one. "
            "Lay the collection out as FOLDER/train/<class>/img and FOLDER/val/<class>/img, or embed a CSV list "
            "with path,label,split rows, and run `embedstore embed` again")
    classes = sorted({str(c) for c in train.labels})
    if len(classes) < 2:
        raise FinetuneError(f"{st.path}: the train split has only one class ({classes[0]!r}); fine-tuning needs two or more")
    known = np.isin(rows.labels, np.asarray(classes, dtype=object))
    for name in ("val", "test"):
        val = rows.take((rows.splits == name) & known)
        if len(val):
            return classes, train, val, name
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for c in classes:
        idx = np.flatnonzero(train.labels == c).tolist()
        held.update(rng.permutation(idx)[: max(1, len(idx) // 5)].tolist() if len(idx) > 1 else [])
    out = np.isin(np.arange(len(train)), np.fromiter(held, dtype=np.int64, count=len(held)))
    return classes, train.take(~out), train.take(out), "20% of train (the store has no val split)"


def linear_probe(sp: Space, train: SplitRows, val: SplitRows, codes: dict[str, int], seed: int) -> dict[str, Any]:
    """L2 normalisation, standardisation and a logistic regression on the cached train vectors (C by 3-fold CV).

    Reads the vectors of ``train`` and ``val`` only, chunk by chunk, in the stored dtype.
    """
    X = read_vectors(sp, train.positions, dtype=np.float64, normalize=True)
    Xv = read_vectors(sp, val.positions, dtype=np.float64, normalize=True)
    y = np.array([codes[str(lab)] for lab in train.labels])
    yv = np.array([codes[str(lab)] for lab in val.labels])
    scaler = StandardScaler().fit(X)
    Z, Zv = scaler.transform(X), scaler.transform(Xv)
    folds = min(3, int(np.bincount(y).min()))
    best_c, best = 1.0, -1.0
    if folds >= 2:
        for c in (0.01, 0.1, 1.0, 10.0):
            accs = [LogisticRegression(C=c, max_iter=2000).fit(Z[a], y[a]).score(Z[b], y[b])
                    for a, b in StratifiedKFold(folds, shuffle=True, random_state=seed).split(Z, y)]
            if np.mean(accs) > best + 1e-9:
                best_c, best = c, float(np.mean(accs))
    lr = LogisticRegression(C=best_c, max_iter=2000).fit(Z, y)
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; two logits with the same softmax
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return {"mean": scaler.mean_, "scale": scaler.scale_, "weight": coef, "bias": intercept, "C": best_c,
            "val_accuracy": float(lr.score(Zv, yv))}
