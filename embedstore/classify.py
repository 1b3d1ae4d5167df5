"""Classical classifier heads over cached features: protocol, model selection, metrics.

Protocol: with train and val/test splits in the store, heads train on ``train`` and are scored
on ``val`` (and on ``test`` when there is one); otherwise stratified k-fold cross-validation.
Hyper-parameters are always chosen on a validation part carved from the training rows only
(a C sweep for linear models and SVMs, as in the CLIP / DINOv2 linear probes; k and the
temperature for k-NN), then the head is refit on all training rows.

Every head is a scikit-learn ``Pipeline(preprocess, classifier)`` with ``predict_proba``; the
k-NN head searches with FAISS (exact cosine similarity) and votes DINOv2-style.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from scipy.linalg import LinAlgWarning
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import accuracy_score, balanced_accuracy_score, classification_report, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from embedstore.choices import PREPROCESS, PROTOCOLS

from .store import Space, StoreError, open_store

DINO_TEMPERATURE = 0.07
_C_GRID = tuple(float(c) for c in np.logspace(-3, 4, 8))


# --------------------------------------------------------------------------- estimators


def _l2(X: np.ndarray) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _vote(sims: np.ndarray, codes: np.ndarray, n_classes: int, vote: str,
          temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and ranking scores from the k nearest neighbours of each query."""
    if vote == "softmax":  # DINOv2: weights softmax(sim / T), summed per class
        weights = _softmax(sims / temperature)
    else:  # plain majority; ties go to the class with the larger summed similarity
        weights = np.full(sims.shape, 1.0 / sims.shape[1])
    proba = np.zeros((len(sims), n_classes))
    np.add.at(proba, (np.arange(len(sims))[:, None], codes), weights)
    if vote == "softmax":
        return proba, proba
    tie = np.zeros_like(proba)
    np.add.at(tie, (np.arange(len(sims))[:, None], codes), sims)
    return proba, proba + 1e-6 * tie


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier on cosine similarity, searched with FAISS.

    Vectors are L2-normalised and searched exactly by inner product (``IndexFlatIP``, BLAS
    batched, in blocks of queries). ``vote="softmax"`` weights the k neighbours by
    softmax(similarity / temperature) as in DINOv2's k-NN evaluation; ``vote="majority"`` counts
    one vote each. The FAISS index is rebuilt from the stored vectors when needed and is never
    serialised.
    """

    def __init__(self, k: int = 20, temperature: float = DINO_TEMPERATURE, vote: str = "softmax", block: int = 4096):
        self.k = k
        self.temperature = temperature
        self.vote = vote
        self.block = block

    def fit(self, X: np.ndarray, y: Sequence) -> "FaissKNNClassifier":
        if self.vote not in ("softmax", "majority"):
            raise ValueError(f"vote must be 'softmax' or 'majority', not {self.vote!r}")
        self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
        self.train_vectors_ = _l2(X)
        self.train_codes_ = codes.astype(np.int64)
        self.n_features_in_ = self.train_vectors_.shape[1]
        self.__dict__.pop("_index", None)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_index", None)
        return state

    def kneighbors(self, X: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and row numbers of the k nearest training vectors."""
        import faiss

        if "_index" not in self.__dict__:
            index = faiss.IndexFlatIP(self.n_features_in_)
            index.add(self.train_vectors_)
            self._index = index
        k = min(k or self.k, len(self.train_vectors_))
        Q = _l2(X)
        sims, idx = np.empty((len(Q), k), np.float32), np.empty((len(Q), k), np.int64)
        for s in range(0, len(Q), self.block):
            sims[s:s + self.block], idx[s:s + self.block] = self._index.search(Q[s:s + self.block], k)
        return sims, idx

    def _scores(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = self.kneighbors(X)
        return _vote(sims, self.train_codes_[idx], len(self.classes_), self.vote, self.temperature)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._scores(X)[0]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self._scores(X)[1].argmax(1)]


class SoftmaxCalibrated(ClassifierMixin, BaseEstimator):
    """A classifier whose ``predict_proba`` is softmax(decision / T) (temperature scaling).

    Predictions are those of the wrapped estimator; the temperature T is fitted on held-out
    decision values (see :func:`fit_temperature`). Gives SVMs, ridge and nearest-centroid
    probabilities, and keeps strongly regularised logistic regressions from being under-confident.
    """

    def __init__(self, estimator: BaseEstimator | None = None, temperature: float = 1.0):
        self.estimator = estimator
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: Sequence) -> "SoftmaxCalibrated":
        self.estimator_ = _quiet_fit(clone(self.estimator), X, y)
        self.classes_ = self.estimator_.classes_
        self.n_features_in_ = self.estimator_.n_features_in_
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return _decision_matrix(self.estimator_.decision_function(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _softmax(self.decision_function(X) / self.temperature)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.estimator_.predict(X)


def _decision_matrix(d: np.ndarray) -> np.ndarray:
    """(n, n_classes) scores; a binary margin d becomes [-d/2, d/2] so softmax gives sigmoid(d)."""
    d = np.asarray(d, dtype=np.float64)
    return np.column_stack([-d / 2, d / 2]) if d.ndim == 1 else d


def fit_temperature(scores: np.ndarray, codes: np.ndarray, smoothing: float = 0.01) -> float:
    """The temperature T minimising the log-loss of softmax(scores / T) on held-out rows.

    The targets are label-smoothed by ``smoothing`` so that a perfectly separated val part
    gives confident, not infinitely sharp, probabilities.
    """
    from scipy.optimize import minimize_scalar

    if len(codes) == 0:
        return 1.0
    rows = np.arange(len(codes))

    def loss(log_t: float) -> float:
        z = scores / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(lse - (1 - smoothing) * z[rows, codes] - smoothing * z.mean(axis=1)))

    scale = float(np.std(scores)) or 1.0
    res = minimize_scalar(loss, bounds=(np.log(scale) - 8, np.log(scale) + 4), method="bounded")
    return float(np.exp(res.x))


# --------------------------------------------------------------------------- model catalogue


@dataclass(frozen=True)
class ModelSpec:
    """A head: how to build it and the hyper-parameter candidates swept on the validation part."""

    name: str
    make: Callable[..., BaseEstimator]
    grid: tuple[dict[str, Any], ...]
    description: str
    calibrate: bool = False  # wrap in SoftmaxCalibrated, T fitted on the val part
    warm_start: bool = False  # grid ordered by increasing C: reuse the previous solution
    sweep: dict[str, Any] = field(default_factory=dict)  # looser settings for the sweep only


def _knn_grid(vote: str) -> tuple[dict[str, Any], ...]:
    temps = (0.03, DINO_TEMPERATURE, 0.2) if vote == "softmax" else (DINO_TEMPERATURE,)
    return tuple({"k": k, "temperature": t} for k in (1, 3, 5, 10, 20, 50) for t in temps)


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


def parse_models(models: str | Sequence[str] | None) -> list[str]:
    """Model names from a comma list or a sequence; ``None`` or ``"all"`` means every model."""
    if models is None or models == "all":
        return list(DEFAULT_MODELS)
    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else [str(m) for m in models]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ValueError(f"unknown model(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(MODELS)}")
    return list(dict.fromkeys(names))


def make_preprocess(name: str, n_rows: int, dim: int) -> BaseEstimator | str:
    """``l2`` (unit rows), ``standard`` (zero mean, unit variance), ``pca-whiten`` (PCA to at
    most 256 whitened components, then unit rows) or ``none``."""
    if name == "l2":
        return Normalizer()
    if name == "standard":
        return StandardScaler()
    if name == "pca-whiten":
        n = max(1, min(256, dim, n_rows - 1))
        return Pipeline([("pca", PCA(n_components=n, whiten=True, random_state=0)), ("l2", Normalizer())])
    if name == "none":
        return "passthrough"
    raise ValueError(f"unknown preprocessing {name!r}: choose from {', '.join(PREPROCESS)}")


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


def _select_knn(spec: ModelSpec, Xa: np.ndarray, ya: np.ndarray, Xb: np.ndarray,
                yb: np.ndarray) -> tuple[int, float, np.ndarray]:
    """One FAISS search with the largest k scores every (k, T) candidate on the val part."""
    est = spec.make(**spec.grid[0]).fit(Xa, ya)
    kmax = max(p["k"] for p in spec.grid)
    sims, idx = est.kneighbors(Xb, kmax)
    codes = est.train_codes_[idx]
    truth = np.searchsorted(est.classes_, yb)
    known = np.isin(yb, est.classes_)
    scores, outs = [], []
    for p in spec.grid:
        k = min(p["k"], sims.shape[1])
        proba, rank = _vote(sims[:, :k], codes[:, :k], len(est.classes_), est.vote, p["temperature"])
        scores.append(float(np.mean((rank.argmax(1) == truth) & known)))
        outs.append(proba)
    i = _middle_best(scores)
    return i, scores[i], outs[i]


def select_params(spec: ModelSpec, Xa: np.ndarray, ya: np.ndarray, Xb: np.ndarray,
                  yb: np.ndarray) -> tuple[dict[str, Any], float, np.ndarray]:
    """Sweep the spec's grid: fit on the train part (Xa), score accuracy on the val part (Xb).

    Returns the chosen parameters, their val accuracy and the val-part decision scores
    (used to fit the softmax temperature of margin classifiers).
    """
    if len(spec.grid) == 1:
        est = _quiet_fit(spec.make(**spec.grid[0]), Xa, ya)
        out = _decision_matrix(est.decision_function(Xb)) if spec.calibrate else np.empty(0)
        return dict(spec.grid[0]), float(accuracy_score(yb, est.predict(Xb))), out
    if isinstance(spec.make(**spec.grid[0]), FaissKNNClassifier):
        i, score, out = _select_knn(spec, Xa, ya, Xb, yb)
        return dict(spec.grid[i]), score, out
    scores, outs, est = [], [], None
    for p in spec.grid:
        if spec.warm_start and est is not None:
            est.set_params(**p)
        else:
            est = spec.make(**p, **spec.sweep)
        _quiet_fit(est, Xa, ya)
        scores.append(float(accuracy_score(yb, est.predict(Xb))))
        outs.append(_decision_matrix(est.decision_function(Xb)) if spec.calibrate else None)
    i = _middle_best(scores)
    return dict(spec.grid[i]), scores[i], outs[i] if outs[i] is not None else np.empty(0)


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
) -> FittedHead:
    """Choose a head's hyper-parameters on a val part carved from (X, y), then refit on all rows.

    Args:
        X: training vectors (n, dim); float16 is converted to float32.
        y: training labels (n,).
        model: a name from :data:`MODELS`.
        preprocess: one of :data:`PREPROCESS`.
        val_fraction: share of each class carved off for the hyper-parameter sweep.
        seed: seed of the carve.
    """
    spec = MODELS[parse_models([model])[0]]
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    t0 = time.perf_counter()
    a, b = carve_validation(y, val_fraction, seed)
    params, val_score, scores = dict(spec.grid[len(spec.grid) // 2]), None, np.empty(0)
    if len(b) and len(np.unique(y[a])) > 1:
        Xa, Xb = _transform(make_preprocess(preprocess, len(a), X.shape[1]), X[a], X[b])
        params, val_score, scores = select_params(spec, Xa, y[a], Xb, y[b])
    clf = spec.make(**params)
    if spec.calibrate:
        codes = np.searchsorted(np.unique(y[a]), y[b]) if len(scores) else np.empty(0, np.int64)
        keep = np.isin(y[b], y[a]) if len(scores) else np.empty(0, bool)
        clf = SoftmaxCalibrated(clf, fit_temperature(scores[keep], codes[keep]) if len(scores) else 1.0)
    pipe = Pipeline([("preprocess", make_preprocess(preprocess, len(y), X.shape[1])), ("classifier", clf)])
    _quiet_fit(pipe, X, y)
    return FittedHead(spec.name, preprocess, pipe, params, val_score, time.perf_counter() - t0)


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
        top = np.asarray(classes, dtype=object)[np.argsort(-proba, axis=1)[:, :5]]
        out["top5_accuracy"] = float(np.mean((top == np.asarray(y_true, dtype=object)[:, None]).any(1)))
    return out


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


# --------------------------------------------------------------------------- protocol


@dataclass
class ClassifyReport:
    """Results of :func:`classify`: one row per space x model, the best head and its report."""

    store: str
    protocol: str
    evaluation: dict[str, Any]
    results: list[dict[str, Any]]
    best: dict[str, Any]
    heads: dict[tuple[str, str], FittedHead] = field(default_factory=dict, repr=False)
    _data: dict[str, tuple[np.ndarray, np.ndarray, Space]] = field(default_factory=dict, repr=False)
    _options: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (what ``embedstore classify --json`` prints)."""
        best = {k: v for k, v in self.best.items() if k != "per_class_text"}
        return {"store": self.store, "protocol": self.protocol, "evaluation": self.evaluation,
                "results": self.results, "best": best}

    def head(self, space: str | None = None, model: str | None = None) -> tuple[FittedHead, Space]:
        """The fitted head of (space, model), the best one by default, with its space.

        Under the split protocol this is the head that was scored (trained on ``train``); under
        cross-validation it is refit on every labelled row.
        """
        space = space or self.best["space"]
        model = model or self.best["model"]
        X, y, sp = self._data[space]
        if (space, model) not in self.heads:
            self.heads[(space, model)] = fit_head(X, y, model=model, **self._options)
        return self.heads[(space, model)], sp

    def save_head(self, folder: str, space: str | None = None, model: str | None = None) -> str:
        """Save a head (the best one by default) with its space's lineage; see :func:`embedstore.heads.save_head`."""
        from .heads import save_head

        head, sp = self.head(space, model)
        row = next(r for r in self.results if r["space"] == sp.name and r["model"] == head.model)
        metrics = {k: row[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy") if k in row}
        metrics.update(protocol=self.protocol, **self.evaluation)
        return str(save_head(folder, head.estimator, space=sp, model=head.model, params=head.params,
                             preprocess=head.preprocess, metrics=metrics, store=self.store,
                             n_train=len(self._data[sp.name][1])))


def _masks(sp: Space) -> dict[str, np.ndarray]:
    labeled = np.array([bool(x) for x in sp.labels])
    return {s: labeled & (sp.splits == s) for s in ("train", "val", "test")} | {"labeled": labeled}


def _common_rows(spaces: list[Space]) -> list[Space]:
    """Restrict several spaces to the images embedded in all of them, so they are compared fairly."""
    if len(spaces) < 2:
        return spaces
    common = spaces[0].rows
    for sp in spaces[1:]:
        common = np.intersect1d(common, sp.rows)
    out = []
    for sp in spaces:
        keep = np.isin(sp.rows, common)
        out.append(Space(sp.name, sp.attrs, sp.rows[keep], sp.vectors[keep], sp.paths[keep], sp.labels[keep],
                         sp.splits[keep]))
    return out


def resolve_protocol(protocol: str, sp: Space, path: str) -> str:
    """``split`` when the store has a train split and a val or test split, else ``cv`` (for ``auto``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose from {', '.join(PROTOCOLS)}")
    m = _masks(sp)
    if not m["labeled"].any():
        raise StoreError(f"{path}: space {sp.name!r} has no labelled image; embed a folder laid out as <class>/img "
                         "or a CSV list path,label to classify")
    has_split = m["train"].any() and (m["val"].any() or m["test"].any())
    if protocol == "split" and not has_split:
        raise StoreError(f"{path} has no train and val/test splits: use --protocol cv, or embed a folder laid out "
                         "as train/<class>/img and val/<class>/img")
    return "split" if protocol == "split" or (protocol == "auto" and has_split) else "cv"


def classify(
    store: str,
    *,
    spaces: Sequence[str] | None = None,
    models: str | Sequence[str] | None = None,
    protocol: str = "auto",
    preprocess: str = "l2",
    folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> ClassifyReport:
    """Train and score classifier heads on a store's cached vectors; compare every space x model.

    Args:
        store: the ``.h5`` store.
        spaces: space names (default: every space; several are compared on their common images).
        models: comma list or sequence of names from :data:`MODELS` (default: all).
        protocol: ``auto`` (split when the store has train and val/test splits, else cv),
            ``split`` or ``cv`` (stratified k-fold over every labelled image).
        preprocess: ``l2``, ``standard``, ``pca-whiten`` or ``none``, fitted on training rows.
        folds: folds of the cv protocol (lowered to the smallest class size).
        val_fraction: share of the training rows carved off to choose hyper-parameters.
        seed: seed of the carve and the folds.
    """
    names = parse_models(models)
    if preprocess not in PREPROCESS:
        raise ValueError(f"unknown preprocessing {preprocess!r}: choose from {', '.join(PREPROCESS)}")
    st = open_store(store)
    chosen = _common_rows([st.space(n) for n in (spaces or list(st.spaces) or [None])])
    proto = resolve_protocol(protocol, chosen[0], str(store))
    options = {"preprocess": preprocess, "val_fraction": val_fraction, "seed": seed}
    report = ClassifyReport(str(store), proto, {}, [], {}, _options=options)
    detail: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, list[str]]] = {}
    for sp in chosen:
        m = _masks(sp)
        X = np.asarray(sp.vectors, dtype=np.float32)
        if proto == "split":
            report._data[sp.name] = (X[m["train"]], sp.labels[m["train"]], sp)
            rows, evaluation = _run_split(sp, X, m, names, options, report)
        else:
            report._data[sp.name] = (X[m["labeled"]], sp.labels[m["labeled"]], sp)
            rows, evaluation = _run_cv(sp, X[m["labeled"]], sp.labels[m["labeled"]], names, options, folds, seed,
                                       str(store))
        report.evaluation = evaluation
        for row, truth, pred, classes in rows:
            report.results.append(row)
            detail[(row["space"], row["model"])] = (truth, pred, classes)
    best = max(report.results, key=lambda r: (r["accuracy"], r["balanced_accuracy"], -r["fit_s"]))
    truth, pred, classes = detail[(best["space"], best["model"])]
    labels = sorted(set(classes) | {str(t) for t in truth})
    report.best = {
        "space": best["space"],
        "model": best["model"],
        "accuracy": best["accuracy"],
        "labels": labels,
        "per_class": classification_report(truth, pred, labels=labels, output_dict=True, zero_division=0),
        "per_class_text": classification_report(truth, pred, labels=labels, zero_division=0, digits=3),
        "confusion_matrix": confusion_matrix(truth, pred, labels=labels).tolist(),
    }
    return report


def _row(sp: Space, head: FittedHead, metrics: dict[str, float], predict_s: float, **extra: Any) -> dict[str, Any]:
    return {"space": sp.name, "model": head.model, **_rounded(metrics), "fit_s": round(head.fit_s, 4),
            "predict_s": round(predict_s, 4), "params": head.params, "preprocess": head.preprocess, **extra}


def _predict(head: FittedHead, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    t0 = time.perf_counter()
    proba = head.estimator.predict_proba(X)
    pred = head.estimator.predict(X)
    return pred, proba, time.perf_counter() - t0


def _run_split(sp: Space, X: np.ndarray, m: dict[str, np.ndarray], names: list[str], options: dict[str, Any],
               report: ClassifyReport) -> tuple[list, dict[str, Any]]:
    primary = "val" if m["val"].any() else "test"
    evaluation = {"train": int(m["train"].sum()), "eval_split": primary, "eval": int(m[primary].sum())}
    if primary == "val" and m["test"].any():
        evaluation["test"] = int(m["test"].sum())
    rows = []
    for name in names:
        head = fit_head(X[m["train"]], sp.labels[m["train"]], model=name, **options)
        report.heads[(sp.name, name)] = head
        pred, proba, predict_s = _predict(head, X[m[primary]])
        truth = sp.labels[m[primary]]
        extra = {"val_score": None if head.val_score is None else round(head.val_score, 4)}
        if "test" in evaluation:
            tpred, tproba, _ = _predict(head, X[m["test"]])
            extra["test"] = _rounded(score_predictions(sp.labels[m["test"]], tpred, tproba, head.classes))
        rows.append((_row(sp, head, score_predictions(truth, pred, proba, head.classes), predict_s, **extra),
                     truth, pred, head.classes))
    return rows, evaluation


def _run_cv(sp: Space, X: np.ndarray, y: np.ndarray, names: list[str], options: dict[str, Any], folds: int,
            seed: int, path: str) -> tuple[list, dict[str, Any]]:
    _, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min()))
    if k < 2 or len(counts) < 2:
        raise StoreError(f"{path}: cross-validation needs at least 2 classes with 2 images each (smallest class has "
                         f"{int(counts.min())}); add images or use a store with train/val splits")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    evaluation = {"folds": k, "eval": len(y),
                  "note": "metrics over out-of-fold predictions; fit_s and predict_s per fold"}
    classes = sorted({str(c) for c in y})
    rows = []
    for name in names:
        pred = np.empty(len(y), dtype=object)
        proba = np.zeros((len(y), len(classes)))
        fit_s = predict_s = 0.0
        params: list[dict[str, Any]] = []
        for tr, te in splitter.split(X, y):
            head = fit_head(X[tr], y[tr], model=name, **options)
            p, pr, dt = _predict(head, X[te])
            pred[te] = p
            proba[np.ix_(te, np.searchsorted(classes, head.classes))] = pr
            fit_s, predict_s = fit_s + head.fit_s, predict_s + dt
            params.append(head.params)
        summary = FittedHead(name, options["preprocess"], head.estimator, _mode(params), None, fit_s / k)
        rows.append((_row(sp, summary, score_predictions(y, pred, proba, classes), predict_s / k,
                          params_per_fold=params), y, pred, classes))
    return rows, evaluation


def _mode(params: list[dict[str, Any]]) -> dict[str, Any]:
    """The most frequent parameter choice across folds."""
    keys = [tuple(sorted(p.items())) for p in params]
    return dict(max(set(keys), key=keys.count))


# --------------------------------------------------------------------------- confusion picture


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
