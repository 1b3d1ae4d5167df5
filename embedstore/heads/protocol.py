"""The comparison protocol's parts: the head catalogue, hyper-parameter selection on a carved
validation part, fitting one head, and the metrics and best-head rule shared by classify and report.

Crash safety: pure computation in memory; nothing here writes a file.

Hyper-parameters are always chosen on a validation part carved from the training rows only
(a C sweep for linear models and SVMs, as in the CLIP / DINOv2 linear probes; k and the
temperature for the softmax k-NN), then the head is refit on all training rows.

Every head is a scikit-learn ``Pipeline(preprocess, classifier)`` with ``predict_proba``; the
k-NN heads search with FAISS (exact cosine similarity, :mod:`embedstore.heads.knn`). Heads without
probabilities of their own (and logistic regression) get scikit-learn's temperature scaling,
``CalibratedClassifierCV(method="temperature", ensemble=False)``: T is fitted on out-of-fold
decision values of the training rows, the classifier itself on all of them.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.base import BaseEstimator, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, top_k_accuracy_score
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from ..choices import PREPROCESS, TEXT_HEADS
from ..errors import HeadError
from .knn import DINO_TEMPERATURE, FaissKNNClassifier
from .knn import vote as knn_vote
from .zeroshot import ZEROSHOT, ZeroShotClassifier

_C_GRID = tuple(float(c) for c in np.logspace(-3, 4, 8))
CALIBRATION_FOLDS = 3  # folds of the out-of-fold decision values that temperature scaling is fitted on

# --------------------------------------------------------------------------- model catalogue


@dataclass(frozen=True)
class ModelSpec:
    """A head: how to build it and the hyper-parameter candidates swept on the validation part."""

    name: str
    make: Callable[..., BaseEstimator]
    grid: tuple[dict[str, Any], ...]
    description: str
    calibrate: bool = False  # wrap in CalibratedClassifierCV(method="temperature")
    warm_start: bool = False  # grid ordered by increasing C: reuse the previous solution
    sweep: dict[str, Any] = field(default_factory=dict)  # looser settings for the sweep only


def _knn_grid(vote: str) -> tuple[dict[str, Any], ...]:
    """k (and T for the softmax vote; the majority vote has no temperature) swept on the val part."""
    ks = (1, 3, 5, 10, 20, 50)
    if vote == "majority":
        return tuple({"n_neighbors": k} for k in ks)
    return tuple({"n_neighbors": k, "temperature": t} for k in ks for t in (0.03, DINO_TEMPERATURE, 0.2))


MODELS: dict[str, ModelSpec] = {
    "logreg": ModelSpec(
        "logreg", lambda **p: LogisticRegression(max_iter=1000, **p),
        tuple({"C": c} for c in _C_GRID), "multinomial logistic regression (L-BFGS), C swept", calibrate=True,
        warm_start=True, sweep={"tol": 1e-3, "warm_start": True}),
    "linear-svm": ModelSpec(
        "linear-svm", lambda **p: LinearSVC(max_iter=5000, **p),
        tuple({"C": c} for c in _C_GRID), "linear SVM (liblinear, one-vs-rest), C swept", calibrate=True),
    "rbf-svm": ModelSpec(
        "rbf-svm", lambda **p: SVC(kernel="rbf", gamma="scale", **p),
        tuple({"C": c} for c in (0.1, 1.0, 10.0, 100.0, 1000.0)), "RBF-kernel SVM, C swept", calibrate=True),
    "ridge": ModelSpec(
        "ridge", lambda **p: RidgeClassifier(**p),
        tuple({"alpha": a} for a in np.logspace(-3, 3, 7).tolist()), "ridge (least-squares) classifier, alpha swept",
        calibrate=True),
    "knn": ModelSpec(
        "knn", lambda **p: FaissKNNClassifier(vote="softmax", **p), _knn_grid("softmax"),
        "FAISS cosine k-NN, DINOv2 weighted vote softmax(sim/T); k and T swept"),
    "knn-majority": ModelSpec(
        "knn-majority", lambda **p: FaissKNNClassifier(vote="majority", **p), _knn_grid("majority"),
        "FAISS cosine k-NN, plain majority vote; k swept"),
    "centroid": ModelSpec(
        "centroid", lambda **p: NearestCentroid(**p), ({},), "nearest class mean (no hyper-parameter)", calibrate=True),
}
DEFAULT_MODELS = tuple(MODELS)


def parse_models(models: str) -> list[str]:
    """The CLI's ``--models``: a comma list of names, or ``"all"`` for every model."""
    return model_names(None if models.strip() == "all" else [m.strip() for m in models.split(",") if m.strip()])


def model_names(models: Sequence[str] | None) -> list[str]:
    """Checked model names, duplicates dropped, in the order given; ``None`` means every model of
    :data:`MODELS` (``zeroshot``, :data:`~embedstore.choices.TEXT_HEADS`, is named explicitly or added
    by ``classify`` for spaces with a text tower)."""
    if models is None:
        return list(DEFAULT_MODELS)
    if isinstance(models, str):
        raise HeadError(f"models takes a list of names such as ['logreg', 'knn'], not the string {models!r} "
                        "(the CLI's comma list is parsed by embedstore.heads.parse_models)")
    names = [str(m) for m in models]
    unknown = [n for n in names if n not in MODELS and n not in TEXT_HEADS]
    if unknown or not names:
        raise HeadError(f"unknown model(s) {', '.join(unknown) or '(none given)'}: choose from "
                        f"{', '.join((*MODELS, *TEXT_HEADS))}")
    return list(dict.fromkeys(names))


def check_preprocess(name: str) -> str:
    """``name`` when it is one of :data:`PREPROCESS`; else HeadError naming the choices."""
    if name not in PREPROCESS:
        raise HeadError(f"unknown preprocessing {name!r}: choose from {', '.join(PREPROCESS)}")
    return name


def make_preprocess(name: str, n_rows: int, dim: int) -> BaseEstimator | str:
    """``l2`` (unit rows), ``standard`` (zero mean, unit variance), ``pca-whiten`` (PCA to at
    most 256 whitened components, then unit rows) or ``none``."""
    check_preprocess(name)
    if name == "l2":
        return Normalizer()
    if name == "standard":
        return StandardScaler()
    if name == "pca-whiten":
        n = max(1, min(256, dim, n_rows - 1))
        return Pipeline([("pca", PCA(n_components=n, whiten=True, random_state=0)), ("l2", Normalizer())])
    return "passthrough"  # "none"


# --------------------------------------------------------------------------- selection and fitting


def carve_validation(y: np.ndarray, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train-part, val-part) row numbers carved from training labels.

    Each class with at least two rows gives ``round(fraction * n)`` rows (at least one, never
    all) to the val part; single-row classes stay in the train part.
    """
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        if len(rows) >= 2:
            val.extend(rows[: min(len(rows) - 1, max(1, round(fraction * len(rows))))].tolist())
    val_idx = np.sort(np.array(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(y)), val_idx), val_idx


@dataclass
class FittedHead:
    """A fitted head with the hyper-parameters chosen and how long choosing and fitting took."""

    model: str
    preprocess: str
    estimator: Pipeline
    params: dict[str, Any]
    val_score: float | None
    fit_s: float

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.estimator.classes_]


def _transform(pre: BaseEstimator | str, X_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    if pre == "passthrough":
        return [X_fit, *others]
    pre = clone(pre).fit(X_fit)
    return [pre.transform(X_fit), *(pre.transform(o) for o in others)]


def _middle_best(scores: list[float]) -> int:
    """Index of the best score; among ties, the middle one of the grid (a stable choice)."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s >= best - 1e-12]
    return tied[len(tied) // 2]


def _select_knn(spec: ModelSpec, Xa: np.ndarray, ya: np.ndarray, Xb: np.ndarray, yb: np.ndarray) -> tuple[int, float]:
    """One FAISS search with the largest k (clamped to the rows there are) scores every candidate."""
    est = spec.make(**spec.grid[0]).fit(Xa, ya)
    sims, idx = est.kneighbors(Xb, max(p["n_neighbors"] for p in spec.grid))
    codes = est.train_codes_[idx]
    truth = np.searchsorted(est.classes_, yb)
    known = np.isin(yb, est.classes_)
    scores = []
    for p in spec.grid:
        k = min(p["n_neighbors"], sims.shape[1])
        proba = knn_vote(sims[:, :k], codes[:, :k], len(est.classes_), est.vote, p.get("temperature"))
        scores.append(float(np.mean((proba.argmax(1) == truth) & known)))
    i = _middle_best(scores)
    return i, scores[i]


def select_params(spec: ModelSpec, Xa: np.ndarray, ya: np.ndarray, Xb: np.ndarray,
                  yb: np.ndarray) -> tuple[dict[str, Any], float]:
    """Sweep the spec's grid: fit on the train part (Xa), score accuracy on the val part (Xb).

    Returns the chosen parameters and their val accuracy.
    """
    if len(spec.grid) == 1:
        est = _quiet_fit(spec.make(**spec.grid[0]), Xa, ya)
        return dict(spec.grid[0]), float(accuracy_score(yb, est.predict(Xb)))
    if isinstance(spec.make(**spec.grid[0]), FaissKNNClassifier):
        i, score = _select_knn(spec, Xa, ya, Xb, yb)
        return dict(spec.grid[i]), score
    scores, est = [], None
    for p in spec.grid:
        if spec.warm_start and est is not None:
            est.set_params(**p)
        else:
            est = spec.make(**p, **spec.sweep)
        _quiet_fit(est, Xa, ya)
        scores.append(float(accuracy_score(yb, est.predict(Xb))))
    i = _middle_best(scores)
    return dict(spec.grid[i]), scores[i]


def _quiet_fit(est: BaseEstimator, X: np.ndarray, y: np.ndarray) -> BaseEstimator:
    with warnings.catch_warnings():  # the sweep visits weak regularisation on purpose
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", LinAlgWarning)
        # NearestCentroid notes features constant within a class (common in fp16 CNN features)
        warnings.filterwarnings("ignore", message=".*within_class_std_dev_", category=UserWarning)
        with np.errstate(invalid="ignore"):
            est.fit(X, y)
    spread = getattr(est, "within_class_std_dev_", None)
    if spread is not None and not np.isfinite(spread).all():
        # NearestCentroid with one row per class: the spread is 0/0 and every decision value would be
        # NaN; without a spread the decision values are plain squared distances to the centroids.
        est.within_class_std_dev_ = np.nan_to_num(spread, nan=0.0)
    return est


def fit_head(
    X: np.ndarray,
    y: np.ndarray,
    *,
    model: str = "logreg",
    preprocess: str = "l2",
    val_fraction: float = 0.2,
    seed: int = 0,
    class_embeddings: Any = None,
) -> FittedHead:
    """Choose a head's hyper-parameters on a val part carved from (X, y), then refit on all rows.

    Args:
        X: training vectors (n, dim); float16 is converted to float32.
        y: training labels (n,).
        model: a name from :data:`MODELS`.
        preprocess: one of :data:`PREPROCESS`.
        val_fraction: share of each class carved off for the hyper-parameter sweep.
        seed: seed of the carve.
        class_embeddings: for ``model="zeroshot"`` only, the text embeddings of each class's
            prompts (``{label: vectors}``, :func:`embedstore.heads.zeroshot.text_class_embeddings`);
            that head learns nothing from (X, y) but its classes, and always uses ``l2``.
    """
    name = model_names([model])[0]
    if name == ZEROSHOT:
        return _fit_zeroshot(X, y, class_embeddings)
    spec = MODELS[name]
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    t0 = time.perf_counter()
    a, b = carve_validation(y, val_fraction, seed)
    params, val_score = dict(spec.grid[len(spec.grid) // 2]), None
    if len(b) and len(np.unique(y[a])) > 1:
        Xa, Xb = _transform(make_preprocess(preprocess, len(a), X.shape[1]), X[a], X[b])
        params, val_score = select_params(spec, Xa, y[a], Xb, y[b])
    pre = make_preprocess(preprocess, len(y), X.shape[1])
    clf = spec.make(**params)
    if spec.calibrate and np.unique(y, return_counts=True)[1].min() < CALIBRATION_FOLDS:
        pipe = _calibrated_on_training_rows(pre, clf, X, y)
    else:
        if spec.calibrate:  # T from out-of-fold decision values; one classifier refit on every row
            clf = CalibratedClassifierCV(clf, method="temperature", cv=CALIBRATION_FOLDS, ensemble=False)
        pipe = _quiet_fit(Pipeline([("preprocess", pre), ("classifier", clf)]), X, y)
    return FittedHead(spec.name, preprocess, pipe, params, val_score, time.perf_counter() - t0)


def _fit_zeroshot(X: np.ndarray, y: np.ndarray, class_embeddings: Any) -> FittedHead:
    """The zero-shot head: cosine similarity to the class embeddings, the classes being those of y."""
    t0 = time.perf_counter()
    clf = ZeroShotClassifier(class_embeddings=class_embeddings)
    pipe = Pipeline([("preprocess", Normalizer()), ("classifier", clf)]).fit(np.asarray(X, np.float32), np.asarray(y))
    return FittedHead(ZEROSHOT, "l2", pipe, {"temperature": clf.temperature}, None, time.perf_counter() - t0)


def _calibrated_on_training_rows(pre: BaseEstimator | str, clf: BaseEstimator, X: np.ndarray,
                                 y: np.ndarray) -> Pipeline:
    """Temperature scaling when a class has fewer rows than ``CALIBRATION_FOLDS``: no held-out part
    exists for it, so T is fitted on the training rows themselves (confident probabilities), for
    the classifier fitted on all of them (a ``FrozenEstimator``, so out-of-fold values are its values;
    every row is given twice so that both folds of scikit-learn's split hold every class)."""
    pre = pre if pre == "passthrough" else clone(pre).fit(X)
    Xt = X if pre == "passthrough" else pre.transform(X)
    cal = CalibratedClassifierCV(FrozenEstimator(_quiet_fit(clf, Xt, y)), method="temperature", cv=2)
    _quiet_fit(cal, np.concatenate([Xt, Xt]), np.concatenate([y, y]))
    return Pipeline([("preprocess", pre), ("classifier", cal)])


# --------------------------------------------------------------------------- metrics


def score_predictions(y_true: np.ndarray, pred: np.ndarray, proba: np.ndarray,
                      classes: Sequence[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall), macro-F1; top-5 with more than 5 classes."""
    out = {
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, average="macro", zero_division=0)),
    }
    if len(classes) > 5:
        out["top5_accuracy"] = _top_k_accuracy(y_true, proba, classes, 5)
    return out


def _top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], k: int) -> float:
    """scikit-learn's ``top_k_accuracy_score`` (its tie rule), with columns put in sorted label order
    and rows whose true label no column has (a class absent from training) counted as misses."""
    names = np.asarray([str(c) for c in classes], dtype=object)
    order = np.argsort(names, kind="stable")
    truth = np.asarray([str(t) for t in y_true], dtype=object)
    known = np.isin(truth, names)
    if not known.any():
        return 0.0
    hit = top_k_accuracy_score(truth[known], np.asarray(proba)[known][:, order], k=k, labels=names[order])
    return float(hit * known.mean())


def best_result(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best of ``classify``'s result rows: the one rule that ``classify`` and ``report`` share.

    Highest accuracy; ties go to the higher balanced accuracy, then the higher macro-F1, then the
    head listed first in :data:`MODELS` (logreg, linear-svm, rbf-svm, ridge, knn, knn-majority,
    centroid), then the space name. Timings are never a tie-break: they differ from run to run,
    so two runs on the same store would name different heads.
    """
    if not results:
        raise HeadError("no classifier result to choose from: pass at least one model and one space")
    order = {name: i for i, name in enumerate(MODELS)}
    return min(results, key=lambda r: (-r["accuracy"], -r["balanced_accuracy"], -r.get("macro_f1", 0.0),
                                       order.get(r["model"], len(order)), r["model"], str(r["space"])))
