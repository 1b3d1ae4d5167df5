"""The fine-tune stage's data: train and val rows from a store's splits, and the linear probe that starts the head (LP-FT).

Crash safety: reads the store's cached vectors and computes in memory; nothing is written.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from .._vectors import l2_normalize
from ..errors import FinetuneError
from ..store import Space, Store

def split_rows(st: Store, sp: Space, seed: int) -> tuple[list[str], list[tuple], list[tuple], str]:
    """(classes, train rows, val rows, where val came from); rows are (path, label, split)."""
    labelled = [(p, lab, s) for p, lab, s in zip(sp.paths, sp.labels, sp.splits) if lab]
    train = [r for r in labelled if r[2] == "train"]
    if not train:
        raise FinetuneError(
            f"{st.path} has no labelled images in a 'train' split (space {sp.name!r}): fine-tuning needs one. "
            "Lay the collection out as FOLDER/train/<class>/img and FOLDER/val/<class>/img, or embed a CSV list "
            "with path,label,split rows, and run `embedstore embed` again")
    classes = sorted({r[1] for r in train})
    if len(classes) < 2:
        raise FinetuneError(f"{st.path}: the train split has only one class ({classes[0]!r}); fine-tuning needs two or more")
    for name in ("val", "test"):
        val = [r for r in labelled if r[2] == name and r[1] in classes]
        if val:
            return classes, train, val, name
    rng = np.random.default_rng(seed)
    held = set()
    for c in classes:
        idx = [i for i, r in enumerate(train) if r[1] == c]
        held.update(rng.permutation(idx)[: max(1, len(idx) // 5)].tolist() if len(idx) > 1 else [])
    return (classes, [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held],
            "20% of train (the store has no val split)")


def linear_probe(sp: Space, train: list[tuple], val: list[tuple], codes: dict[str, int], seed: int) -> dict[str, Any]:
    """L2 normalisation, standardisation and a logistic regression on the cached train vectors (C by 3-fold CV)."""
    index = {p: i for i, p in enumerate(sp.paths)}
    X = l2_normalize(sp.vectors[[index[p] for p, _, _ in train]], np.float64)
    Xv = l2_normalize(sp.vectors[[index[p] for p, _, _ in val]], np.float64)
    y = np.array([codes[lab] for _, lab, _ in train])
    yv = np.array([codes[lab] for _, lab, _ in val])
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
