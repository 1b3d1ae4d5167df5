"""``classify``: train and score classifier heads on a store's cached vectors, every space x model.

Crash safety: reads the store and computes in memory; nothing here writes a file (the CLI writes
the confusion picture, :mod:`embedstore.heads.saved` saves heads atomically).

Protocol: with train and val/test splits in the store, heads train on ``train`` and are scored
on ``val`` (and on ``test`` when there is one); otherwise stratified k-fold cross-validation.
Each head is chosen and fitted by :func:`embedstore.heads.protocol.fit_head`. On a space with a
text tower (an ``open_clip:`` backbone) the zero-shot head (:mod:`.zeroshot`) is compared too: the
class names become prompts ("a photo of a {label}."), encoded by the space's text tower.

Only the rows used are read: the labelled positions come from the space's label and split codes,
their vectors are read in chunks in the stored dtype and converted to float32 chunk by chunk
(:mod:`embedstore.heads.rows`), so memory follows the labelled rows, not the collection size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix
from sklearn.model_selection import StratifiedKFold

from ..backbones.registry import has_text_tower
from ..choices import PROTOCOLS
from ..errors import HeadError, StoreError
from ..store import Space, open_store
from .protocol import FittedHead, best_result, check_preprocess, fit_head, model_names, score_predictions
from .rows import Labelled, common_positions, labelled_rows, read_vectors
from .zeroshot import DEFAULT_TEMPLATES, ZEROSHOT, text_class_embeddings


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
    _text: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # zeroshot's class prompts

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (what ``embedstore classify --json`` prints)."""
        best = {k: v for k, v in self.best.items() if k != "per_class_text"}
        return {"store": self.store, "protocol": self.protocol, "evaluation": self.evaluation,
                "results": self.results, "best": best}

    def head(self, space: str | None = None, model: str | None = None) -> tuple[FittedHead, Space]:
        """The fitted head of (space, model), the best one by default, with its space.

        Under the split protocol this is the head that was scored (trained on ``train``); under
        cross-validation it is refit on every labelled row. The space is the store's (when several
        spaces were compared, the head was trained on their common images only).
        """
        space = space or self.best["space"]
        model = model or self.best["model"]
        X, y, sp = self._data[space]
        if (space, model) not in self.heads:
            self.heads[(space, model)] = fit_head(X, y, model=model, class_embeddings=self._text.get(space),
                                                  **self._options)
        return self.heads[(space, model)], sp

    def save_head(self, folder: str, space: str | None = None, model: str | None = None) -> str:
        """Save a head (the best one by default) with its space's lineage; see :func:`embedstore.heads.save_head`."""
        from .saved import save_head

        head, sp = self.head(space, model)
        row = next(r for r in self.results if r["space"] == sp.name and r["model"] == head.model)
        metrics = {k: row[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy") if k in row}
        metrics.update(protocol=self.protocol, **self.evaluation)
        return str(save_head(folder, head.estimator, space=sp, model=head.model, params=head.params,
                             preprocess=head.preprocess, metrics=metrics, store=self.store,
                             n_train=len(self._data[sp.name][1])))


def _common_rows(spaces: list[Space]) -> list[Labelled]:
    """The labelled rows of each space among the images embedded in all of them (compared fairly),
    in each space's position order; found from row numbers and label/split codes, no vector read."""
    return [labelled_rows(sp, keep) for sp, keep in zip(spaces, common_positions(spaces))]


def _has_split(lab: Labelled) -> bool:
    return bool(lab.mask("train").any() and (lab.mask("val").any() or lab.mask("test").any()))


def resolve_protocol(protocol: str, sp: Space, path: str, labelled: Labelled | None = None) -> str:
    """``split`` when the store has a train split and a val or test split, else ``cv`` (for ``auto``).

    ``labelled``: the space's labelled rows when already found (default: read from ``sp``'s codes).
    """
    if protocol not in PROTOCOLS:
        raise HeadError(f"unknown protocol {protocol!r}: choose from {', '.join(PROTOCOLS)}")
    lab = labelled_rows(sp) if labelled is None else labelled
    if not len(lab):
        raise StoreError(f"{path}: space {sp.name!r} has no labelled image; embed a folder laid out as <class>/img "
                         "or a CSV list path,label to classify")
    has_split = _has_split(lab)
    if protocol == "split" and not has_split:
        raise StoreError(f"{path} has no train and val/test splits: use --protocol cv, or embed a folder laid out "
                         "as train/<class>/img and val/<class>/img")
    return "split" if protocol == "split" or (protocol == "auto" and has_split) else "cv"


def classify(
    store: str,
    *,
    spaces: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
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
        models: names from :data:`MODELS` or ``"zeroshot"``, e.g. ``["logreg", "knn"]`` (default
            ``None``: all of :data:`MODELS`, and ``zeroshot`` for spaces with a text tower; naming
            ``zeroshot`` for a space without one raises ``HeadError``).
        protocol: ``auto`` (split when the store has train and val/test splits, else cv),
            ``split`` or ``cv`` (stratified k-fold over every labelled image).
        preprocess: ``l2``, ``standard``, ``pca-whiten`` or ``none``, fitted on training rows.
        folds: folds of the cv protocol (lowered to the smallest class size).
        val_fraction: share of the training rows carved off to choose hyper-parameters.
        seed: seed of the carve and the folds.
    """
    names = model_names(models)
    check_preprocess(preprocess)
    st = open_store(store)
    chosen = [st.space(n) for n in (spaces or list(st.spaces) or [None])]
    grids = {sp.name: _space_models(sp, names, models is None) for sp in chosen}
    selected = _common_rows(chosen)
    proto = resolve_protocol(protocol, chosen[0], str(store), selected[0])
    options = {"preprocess": preprocess, "val_fraction": val_fraction, "seed": seed}
    report = ClassifyReport(str(store), proto, {}, [], {}, _options=options)
    detail: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, list[str]]] = {}
    for sp, lab in zip(chosen, selected):
        if proto == "split":  # the rows of the three splits only
            lab = lab.subset(np.isin(lab.splits, ("train", "val", "test")))
        X, y = read_vectors(sp, lab.positions), lab.labels  # only the rows used, float32 chunk by chunk
        text = report._text[sp.name] = _class_prompts(sp, y) if ZEROSHOT in grids[sp.name] else {}
        if proto == "split":
            m = {s: lab.mask(s) for s in ("train", "val", "test")}
            report._data[sp.name] = (X[m["train"]], y[m["train"]], sp)
            rows, evaluation = _run_split(sp, X, y, m, grids[sp.name], options, report, text)
        else:
            report._data[sp.name] = (X, y, sp)
            rows, evaluation = _run_cv(sp, X, y, grids[sp.name], options, folds, seed, str(store), text)
        prompts = {"zeroshot_prompts": list(DEFAULT_TEMPLATES)} if any(report._text.values()) else {}
        report.evaluation = {**evaluation, **prompts}
        for row, truth, pred, classes in rows:
            report.results.append(row)
            detail[(row["space"], row["model"])] = (truth, pred, classes)
    best = best_result(report.results)
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


def _space_models(sp: Space, names: list[str], default: bool) -> list[str]:
    """The heads compared on ``sp``: ``names``, plus ``zeroshot`` by default where the space has a
    text tower; HeadError when ``zeroshot`` is asked for a space without one."""
    if has_text_tower(sp.attrs):
        return names + [ZEROSHOT] if default and ZEROSHOT not in names else names
    if ZEROSHOT in names:
        raise HeadError(f"the zeroshot head needs a space with a text tower, and space {sp.name!r} was embedded with "
                        f"{sp.attrs.get('backbone', sp.attrs.get('imported_from'))!r}: embed the collection with an "
                        "open_clip: backbone (e.g. --backbone open_clip:ViT-B-32 --weights laion2b_s34b_b79k), "
                        "or leave zeroshot out of the models")
    return names


def _class_prompts(sp: Space, y: np.ndarray) -> dict[str, np.ndarray]:
    """``{label: prompt embeddings}`` of every label in ``y``, by the space's text tower (weights checksum checked)."""
    from ..embedding.text import embed_texts  # torch and open_clip: only spaces with a text tower get here

    return text_class_embeddings(sorted({str(v) for v in y}), lambda texts: embed_texts(sp, texts))


def _row(sp: Space, head: FittedHead, metrics: dict[str, float], predict_s: float, **extra: Any) -> dict[str, Any]:
    return {"space": sp.name, "model": head.model, **_rounded(metrics), "fit_s": round(head.fit_s, 4),
            "predict_s": round(predict_s, 4), "params": head.params, "preprocess": head.preprocess, **extra}


def _predict(head: FittedHead, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(predictions, probabilities, seconds). Every head predicts the class of its largest probability
    (temperature-scaled heads and the k-NN heads alike), so the probabilities are computed once."""
    t0 = time.perf_counter()
    proba = head.estimator.predict_proba(X)
    pred = head.estimator.classes_[proba.argmax(1)]
    return pred, proba, time.perf_counter() - t0


def _run_split(sp: Space, X: np.ndarray, y: np.ndarray, m: dict[str, np.ndarray], names: list[str],
               options: dict[str, Any], report: ClassifyReport,
               text: dict[str, np.ndarray]) -> tuple[list, dict[str, Any]]:
    """Train on the ``train`` rows of (X, y), score on val (or test); ``m``: split masks over those rows."""
    primary = "val" if m["val"].any() else "test"
    evaluation = {"train": int(m["train"].sum()), "eval_split": primary, "eval": int(m[primary].sum())}
    if primary == "val" and m["test"].any():
        evaluation["test"] = int(m["test"].sum())
    rows = []
    for name in names:
        head = fit_head(X[m["train"]], y[m["train"]], model=name, class_embeddings=text, **options)
        report.heads[(sp.name, name)] = head
        pred, proba, predict_s = _predict(head, X[m[primary]])
        truth = y[m[primary]]
        extra = {"val_score": None if head.val_score is None else round(head.val_score, 4)}
        if "test" in evaluation:
            tpred, tproba, _ = _predict(head, X[m["test"]])
            extra["test"] = _rounded(score_predictions(y[m["test"]], tpred, tproba, head.classes))
        rows.append((_row(sp, head, score_predictions(truth, pred, proba, head.classes), predict_s, **extra),
                     truth, pred, head.classes))
    return rows, evaluation


def _run_cv(sp: Space, X: np.ndarray, y: np.ndarray, names: list[str], options: dict[str, Any], folds: int,
            seed: int, path: str, text: dict[str, np.ndarray]) -> tuple[list, dict[str, Any]]:
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
            head = fit_head(X[tr], y[tr], model=name, class_embeddings=text, **options)
            p, pr, dt = _predict(head, X[te])
            pred[te] = p
            proba[np.ix_(te, np.searchsorted(classes, head.classes))] = pr
            fit_s, predict_s = fit_s + head.fit_s, predict_s + dt
            params.append(head.params)
        summary = FittedHead(name, head.preprocess, head.estimator, _mode(params), None, fit_s / k)
        rows.append((_row(sp, summary, score_predictions(y, pred, proba, classes), predict_s / k,
                          params_per_fold=params), y, pred, classes))
    return rows, evaluation


def _mode(params: list[dict[str, Any]]) -> dict[str, Any]:
    """The most frequent parameter choice across folds; among equally frequent ones, the first fold's
    (a set's order would depend on the process's string hashing, so two runs could differ)."""
    keys = [tuple(sorted(p.items())) for p in params]
    return dict(max(dict.fromkeys(keys), key=keys.count))
