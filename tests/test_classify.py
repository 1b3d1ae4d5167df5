"""Classifier heads over cached vectors: real accuracy, protocols, k-NN, metrics, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from imagegen import TINY_BACKBONE, make_collection
from PIL import Image

import embedstore
from embedstore.heads import (
    MODELS,
    FaissKNNClassifier,
    carve_validation,
    classify,
    fit_head,
    parse_models,
    score_predictions,
    write_confusion_png,
)
from embedstore.errors import StoreError
from embedstore_cli.classify_commands import register

RESULT_KEYS = {"space", "model", "accuracy", "balanced_accuracy", "macro_f1", "fit_s", "predict_s", "params"}


def cli() -> click.Group:
    @click.group()
    def group() -> None:
        pass

    register(group)
    return group


def test_every_head_separates_generated_classes(tiny_store: Path) -> None:
    report = classify(str(tiny_store))
    assert report.protocol == "split"
    assert report.evaluation == {"train": 18, "eval_split": "val", "eval": 18}
    assert [r["model"] for r in report.results] == list(MODELS)
    for r in report.results:
        assert RESULT_KEYS <= set(r)
        assert r["accuracy"] >= 0.8, r  # 3 separable classes, chance is 1/3
    assert report.best["accuracy"] >= 0.94
    assert sum(map(sum, report.best["confusion_matrix"])) == 18
    assert set(report.best["labels"]) == {"red_disc", "green_square", "blue_stripes"}


def test_cv_protocol_when_the_store_has_no_splits(tmp_path: Path) -> None:
    images = make_collection(tmp_path / "flat", per_class=8, splits=())
    store = tmp_path / "flat.h5"
    embedstore.embed(images, store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    report = classify(str(store), models=["logreg", "knn"], folds=4)
    assert report.protocol == "cv"
    assert report.evaluation["folds"] == 4 and report.evaluation["eval"] == 24
    assert all(r["accuracy"] >= 0.8 for r in report.results)
    assert all(len(r["params_per_fold"]) == 4 for r in report.results)
    head, space = report.head()  # refit on every labelled row
    assert (head.estimator.predict(space.vectors.astype(np.float32)) == space.labels).mean() >= 0.9
    with pytest.raises(StoreError, match="--protocol cv"):
        classify(str(store), protocol="split")


def test_faiss_knn_matches_brute_force_cosine_votes() -> None:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 16)), rng.integers(0, 4, 200).astype(str)
    Q = rng.normal(size=(30, 16))
    norm = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731
    sims = norm(Q) @ norm(X).T
    top = np.argsort(-sims, axis=1)[:, :7]
    knn = FaissKNNClassifier(n_neighbors=7, temperature=0.1).fit(X, y)
    w = np.exp(np.take_along_axis(sims, top, 1) / 0.1)
    expected = np.stack([[w[i][y[top[i]] == c].sum() for c in knn.classes_] for i in range(len(Q))])
    np.testing.assert_allclose(knn.predict_proba(Q), expected / expected.sum(1, keepdims=True), rtol=1e-4)
    majority = FaissKNNClassifier(n_neighbors=7, vote="majority").fit(X, y)
    counts = np.stack([[np.sum(y[top[i]] == c) for c in knn.classes_] for i in range(len(Q))])
    np.testing.assert_allclose(majority.predict_proba(Q), counts / 7)
    assert (majority.predict(Q) == knn.classes_[counts.argmax(1)])[counts.max(1) > 3].all()


def test_carve_is_stratified_disjoint_and_seeded() -> None:
    y = np.array(["a"] * 10 + ["b"] * 5 + ["c"])
    a, b = carve_validation(y, 0.2, seed=3)
    assert not set(a) & set(b) and len(a) + len(b) == len(y)
    assert sorted(y[b]) == ["a", "a", "b"]  # c has one row: it stays in train
    np.testing.assert_array_equal(b, carve_validation(y, 0.2, seed=3)[1])


def test_hyperparameters_do_not_depend_on_evaluation_rows(tiny_store: Path) -> None:
    sp = embedstore.open_store(tiny_store).space()
    train = sp.splits == "train"
    X = sp.vectors.astype(np.float32)
    head = fit_head(X[train], sp.labels[train], model="logreg")
    again = fit_head(X[train], sp.labels[train], model="logreg")
    assert head.params == again.params and head.val_score is not None
    assert (head.estimator.predict(X[~train]) == sp.labels[~train]).mean() >= 0.9
    assert np.allclose(head.estimator.predict_proba(X[~train]).sum(1), 1)


def test_metrics_balanced_accuracy_and_top5() -> None:
    from sklearn.metrics import top_k_accuracy_score

    classes = [str(i) for i in range(7)]
    y = np.array(["0"] * 8 + ["1"] * 2)
    pred = np.array(["0"] * 8 + ["0", "1"])
    proba = np.full((10, 7), 0.01)
    proba[np.arange(10), [classes.index(p) for p in pred]] = 0.9
    m = score_predictions(y, pred, proba, classes)
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    # row 8 ties classes 1..6 at 0.01 for the last 4 places: scikit-learn's tie rule decides (class 1 is out)
    assert m["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y, proba, k=5, labels=classes)) == 0.9
    assert "top5_accuracy" not in score_predictions(y, pred, proba[:, :2], classes[:2])


def test_top5_follows_the_column_labels_not_their_order() -> None:
    """Columns listed in another order than sorted, and a true label no column has (unseen in training)."""
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(1)
    classes = [f"c{i}" for i in range(8)]
    y = rng.choice(classes, 40)
    proba = rng.dirichlet(np.ones(8), 40)
    expected = top_k_accuracy_score(y, proba, k=5, labels=classes)
    shuffled = rng.permutation(8)
    got = score_predictions(y, y, proba[:, shuffled], [classes[i] for i in shuffled])["top5_accuracy"]
    assert got == pytest.approx(round(expected, 4), abs=1e-4) and 0 < got < 1
    y_unseen = y.copy()
    y_unseen[:10] = "never-trained"
    known = y_unseen != "never-trained"
    got = score_predictions(y_unseen, y_unseen, proba, classes)["top5_accuracy"]
    assert got == pytest.approx(top_k_accuracy_score(y[known], proba[known], k=5, labels=classes) * 30 / 40)


def test_temperature_scaling_is_scikit_learns_and_gives_calibrated_probabilities() -> None:
    """Heads without probabilities of their own use CalibratedClassifierCV(method="temperature"):
    on overlapping classes their confidence follows their held-out accuracy."""
    from sklearn.calibration import CalibratedClassifierCV

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (3, 16))
    y = np.repeat(["a", "b", "c"], 200)
    X = (centers[np.searchsorted(["a", "b", "c"], y)] + rng.normal(0, 1.6, (600, 16))).astype(np.float32)
    tr, te = np.arange(600) % 2 == 0, np.arange(600) % 2 == 1
    for model in ("logreg", "linear-svm", "ridge", "centroid"):
        head = fit_head(X[tr], y[tr], model=model, preprocess="standard")
        clf = head.estimator.named_steps["classifier"]
        assert isinstance(clf, CalibratedClassifierCV) and clf.method == "temperature", model
        proba = head.estimator.predict_proba(X[te])
        accuracy = float(np.mean(head.estimator.predict(X[te]) == y[te]))
        assert 0.55 < accuracy < 0.97, (model, accuracy)  # overlapping, not separable
        assert np.allclose(proba.sum(1), 1)
        assert abs(proba.max(1).mean() - accuracy) < 0.1, (model, proba.max(1).mean(), accuracy)


def test_knn_majority_neither_shows_nor_tunes_a_temperature(tiny_store: Path) -> None:
    """F11: the majority vote does not use a temperature, so its grid, its chosen parameters and
    the classify table leave it out; the softmax vote still tunes it."""
    assert all(set(p) == {"n_neighbors"} for p in MODELS["knn-majority"].grid)
    report = classify(str(tiny_store), models=["knn-majority", "knn"])
    majority, softmax = report.results
    assert set(majority["params"]) == {"n_neighbors"}
    assert set(softmax["params"]) == {"n_neighbors", "temperature"}
    res = CliRunner().invoke(cli(), ["classify", str(tiny_store), "--models", "knn-majority", "--no-confusion"])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if " knn-majority " in f" {line} ")
    assert "n_neighbors=" in row and "temperature" not in row


@pytest.mark.parametrize("per_class", [1, 2, 3])
def test_every_head_fits_the_smallest_classes(per_class: int) -> None:
    """A store's first images (a prefix during a run, a tiny labelled set): every head gives
    finite probabilities, even where a class has a single row left after the carve."""
    centers = np.eye(3, 16, dtype=np.float32) * 4
    rng = np.random.default_rng(per_class)
    X = np.repeat(centers, per_class, axis=0) + rng.normal(0, 0.1, (3 * per_class, 16)).astype(np.float32)
    y = np.repeat(["a", "b", "c"], per_class)
    for model in MODELS:
        head = fit_head(X, y, model=model)
        proba = head.estimator.predict_proba(centers)
        assert np.isfinite(proba).all() and np.allclose(proba.sum(1), 1), model
        assert list(head.estimator.predict(centers)) == ["a", "b", "c"], model


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="choose from"):
        parse_models("logreg,xgboost")
    assert parse_models("all") == list(MODELS)


def test_confusion_picture_is_a_png(tmp_path: Path) -> None:
    out = write_confusion_png(str(tmp_path / "cm.png"), [[5, 1], [0, 6]], ["ants", "bees"], "t")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_cli_classify_json_table_and_picture(tiny_store: Path, tmp_path: Path) -> None:
    png = tmp_path / "cm.png"
    res = CliRunner().invoke(cli(), ["classify", str(tiny_store), "--models", "logreg,knn,centroid",
                                     "--json", "--confusion", str(png)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["protocol"] == "split"
    assert [r["model"] for r in out["results"]] == ["logreg", "knn", "centroid"]
    assert all(RESULT_KEYS <= set(r) for r in out["results"])
    assert out["best"]["confusion_png"] == str(png) and png.stat().st_size > 0
    res = CliRunner().invoke(cli(), ["classify", str(tiny_store), "--models", "knn-majority", "--no-confusion"])
    assert res.exit_code == 0, res.output
    assert "best:" in res.output and "knn-majority" in res.output and "recall" in res.output
    res = CliRunner().invoke(cli(), ["classify", str(tmp_path / "missing.h5")])
    assert res.exit_code == 1 and "embedstore embed" in res.output


def test_pipeline_of_embedding_transformer_and_sklearn_head(collection: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    def files(split: str) -> tuple[list[str], list[str]]:
        paths = sorted((collection / split).rglob("*.png"))
        return [str(p) for p in paths], [p.parent.name for p in paths]

    pipe = make_pipeline(embedstore.EmbeddingTransformer(TINY_BACKBONE, weights="random", workers=0),
                         Normalizer(), LogisticRegression(C=10.0))
    pipe.fit(*files("train"))
    X_val, y_val = files("val")
    assert (pipe.predict(X_val) == np.array(y_val)).mean() >= 0.9


def test_library_takes_model_names_as_a_list_and_user_mistakes_are_embedstore_errors(tiny_store: Path) -> None:
    """classify(models=...) is typed: a list of names (None: all); the comma string is the CLI's to parse."""
    from embedstore.errors import EmbedstoreError, HeadError
    from embedstore.heads import best_result, model_names
    from embedstore.heads.protocol import make_preprocess

    assert model_names(None) == list(MODELS) and model_names(("knn", "logreg", "knn")) == ["knn", "logreg"]
    assert parse_models("knn, logreg") == ["knn", "logreg"]
    with pytest.raises(HeadError, match=r"list of names such as \['logreg', 'knn'\]"):
        classify(str(tiny_store), models="logreg,knn")
    for call, match in ((lambda: classify(str(tiny_store), models=["xgboost"]), "unknown model.*choose from"),
                        (lambda: classify(str(tiny_store), models=[]), "none given"),
                        (lambda: classify(str(tiny_store), models=["knn"], protocol="loo"), "unknown protocol"),
                        (lambda: classify(str(tiny_store), models=["knn"], preprocess="zca"), "unknown preprocessing"),
                        (lambda: make_preprocess("zca", 4, 4), "unknown preprocessing"),
                        (lambda: best_result([]), "no classifier result"),
                        (lambda: FaissKNNClassifier(vote="mean").fit(np.eye(2), ["a", "b"]), "vote")):
        with pytest.raises(EmbedstoreError, match=match) as info:
            call()
        assert isinstance(info.value, ValueError)  # callers catching ValueError still do
