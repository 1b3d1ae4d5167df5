"""Label issues: out-of-fold probabilities from a head of the comparison protocol, ranked by cleanlab.

Crash safety: pure computation in memory over vectors already read; nothing here writes a file.

Every labelled image is scored by a head that never saw it: scikit-learn's ``cross_val_predict``
over ``StratifiedKFold`` fits :class:`ProtocolHead` (the head :func:`embedstore.heads.fit_head`
makes, with its hyper-parameter sweep and temperature scaling, on the training folds only) and
keeps each held-out row's probabilities. BLAS runs on the cores that are free (threads spinning on
busy cores make the fits many times slower). cleanlab's ``find_label_issues`` (confident learning) then
picks the rows whose given label disagrees with those probabilities and ranks them by
self-confidence, the out-of-fold probability of the given label (lowest first).

A class with a single image is left out (with a note): no fold can learn it, so its row would be
scored without any example of its label. Such a label is often a typo of another one.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from ..choices import HEADS
from ..errors import HeadError
from ..heads.protocol import fit_head
from ..utils import free_cores

RANK_BY = "self_confidence"  # cleanlab's ranking of the issues it finds: the given label's probability


class ProtocolHead(ClassifierMixin, BaseEstimator):
    """A head of the comparison protocol as one scikit-learn estimator (what ``cross_val_predict`` refits per fold).

    ``fit`` runs :func:`embedstore.heads.fit_head` (hyper-parameters chosen on a part carved from the
    rows given, then refit on all of them); ``predict_proba`` is that head's.
    """

    def __init__(self, model: str = "logreg", preprocess: str = "l2", seed: int = 0) -> None:
        self.model = model
        self.preprocess = preprocess
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> "ProtocolHead":
        self.head_ = fit_head(X, y, model=self.model, preprocess=self.preprocess, seed=self.seed)
        self.classes_ = self.head_.estimator.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.head_.estimator.predict_proba(np.asarray(X, dtype=np.float32))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


def check_head(head: str) -> str:
    """``head`` when it is a trainable head name (:data:`embedstore.choices.HEADS`); else HeadError."""
    if head not in HEADS:
        raise HeadError(f"cannot audit labels with head {head!r}: choose one of {', '.join(HEADS)} (a head trained "
                        "on the labels, scored out of fold)")
    return head


def out_of_fold_proba(X: np.ndarray, y: np.ndarray, *, head: str = "logreg", folds: int = 5, seed: int = 0,
                      preprocess: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, classes), sorted class names): row i's come from a head fitted on the folds without it.

    ``folds`` is lowered to the size of the largest class (``StratifiedKFold`` needs it); a class with
    fewer rows than folds is missing from some training folds, and a row scored by such a fold gets
    probability 0 for that class (never a value from a head that saw the row).
    """
    check_head(head)
    y = np.asarray([str(v) for v in y], dtype=object)
    classes, codes = np.unique(y, return_inverse=True)
    k = min(int(folds), int(np.bincount(codes).max()))
    if k < 2 or len(classes) < 2:
        raise HeadError(f"out-of-fold probabilities need at least 2 classes and 2 folds ({len(classes)} class(es), "
                        f"largest with {int(np.bincount(codes).max()) if len(codes) else 0} row(s))")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    # small classes: sklearn warns that some folds lack them (handled above); BLAS only on the free cores
    with warnings.catch_warnings(), threadpool_limits(free_cores(most=None)):
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*Number of classes in training fold.*", category=RuntimeWarning)
        proba = cross_val_predict(ProtocolHead(head, preprocess, seed), np.asarray(X, dtype=np.float32), codes,
                                  cv=cv, method="predict_proba")
    return proba, classes


@dataclass
class LabelCheck:
    """What the label check found: ranked issues (indices into the rows given) and how it was run."""

    issues: np.ndarray  # indices of the flagged rows, most suspicious first
    proba: np.ndarray  # out-of-fold probabilities of the rows checked (n_checked, classes)
    classes: np.ndarray  # column names of proba
    checked: np.ndarray  # indices of the rows checked (rows of single-image classes are left out)
    folds: int = 0
    notes: list[str] = field(default_factory=list)


def find_issues(X: np.ndarray, labels: np.ndarray, *, head: str = "logreg", folds: int = 5,
                seed: int = 0) -> LabelCheck:
    """Label issues among labelled rows (X, labels): out-of-fold probabilities, then cleanlab's
    ``find_label_issues`` ranked by self-confidence. Inputs that cannot be checked (one class, a class
    per row) give no issue and a note saying why, never an error."""
    from cleanlab.filter import find_label_issues

    check_head(head)
    if folds < 2:
        raise HeadError(f"folds must be at least 2, not {folds}")
    labels = np.asarray([str(v) for v in labels], dtype=object)
    names, counts = np.unique(labels, return_counts=True)
    notes: list[str] = []
    single = names[counts < 2]
    if len(single):
        more = f" and {len(single) - 10} more" if len(single) > 10 else ""
        shown = ", ".join(repr(str(s)) for s in single[:10]) + more
        notes.append(f"{len(single)} label(s) with a single image left out of the check (nothing else teaches a head "
                     f"that label; often a typo of another one): {shown}")
    checked = np.flatnonzero(np.isin(labels, names[counts >= 2]))
    empty = LabelCheck(np.empty(0, np.int64), np.empty((0, 0)), np.empty(0, object), checked, 0, notes)
    kept = names[counts >= 2]
    if len(kept) < 2:
        notes.append(f"the label check needs at least 2 labels with 2 images each ({len(kept)} such label(s)): skipped")
        return empty
    fold_count = min(folds, int(counts[counts >= 2].max()))
    small = kept[counts[counts >= 2] < fold_count]
    if len(small):
        notes.append(f"{len(small)} label(s) have fewer images than the {fold_count} folds: some training folds "
                     "lack them, and their images are scored by heads that never saw the label in that fold")
    if fold_count < folds:
        notes.append(f"folds lowered from {folds} to {fold_count}: the largest label has {fold_count} images")
    proba, classes = out_of_fold_proba(X[checked], labels[checked], head=head, folds=folds, seed=seed)
    codes = np.searchsorted(classes, labels[checked])
    ranked = find_label_issues(codes, proba, return_indices_ranked_by=RANK_BY, n_jobs=1)
    return LabelCheck(checked[np.asarray(ranked, dtype=np.int64)], proba, classes, checked, fold_count, notes)


def issue_rows(check: LabelCheck, labels: np.ndarray) -> list[dict[str, Any]]:
    """Per flagged row (most suspicious first): index, given label, suggested label (the most probable
    out of fold), score (the given label's out-of-fold probability) and the suggested label's probability."""
    if not len(check.issues):
        return []
    at = np.searchsorted(check.checked, check.issues)  # the flagged rows' places among the rows checked
    p = check.proba[at]
    given = np.searchsorted(check.classes, np.asarray([str(v) for v in labels[check.issues]], dtype=object))
    best = p.argmax(1)
    return [{"index": int(i), "label": str(check.classes[g]), "suggested": str(check.classes[b]),
             "score": round(float(row[g]), 6), "suggested_score": round(float(row[b]), 6)}
            for i, g, b, row in zip(check.issues, given, best, p)]

