"""The zero-shot head: ZeroShotClassifier (scikit-learn's checks, cosine scores, alignment with y's classes)
and ``classify`` comparing it beside the trained heads on a space with a text tower (the tiny CLIP)."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks

from embedstore.errors import HeadError
from embedstore.heads.zeroshot import ZeroShotClassifier, class_prompts, text_class_embeddings


class _ClassMeansAsEmbeddings(ZeroShotClassifier):
    """A test double for scikit-learn's checks only. They fit on data they generate (1 to 10 features,
    labels of their own), which no fixed text embedding can match; this double takes each class's
    embedding from the mean of its rows instead. That is the one method it replaces: validation,
    alignment, scores, probabilities, cloning and pickling are ZeroShotClassifier's own code."""

    def _given(self, X: np.ndarray, y: np.ndarray) -> dict:
        return {c: X[y == c].mean(0) for c in np.unique(y)}


@parametrize_with_checks([_ClassMeansAsEmbeddings()])
def test_sklearn_estimator_checks(estimator, check) -> None:
    check(estimator)


def _fixed() -> ZeroShotClassifier:
    rng = np.random.default_rng(0)
    return ZeroShotClassifier(class_embeddings={c: rng.normal(size=8) for c in (0, 1, 2)})


# Checks that fit on the data they generate themselves: of 1 to 10 features and labels such as 0/1/2 or
# "one"/"two", which fixed 8-dimensional class embeddings of labels 0, 1, 2 cannot match. A zero-shot
# model does not learn its classes from X, so fitting it to arbitrary data is not meaningful; fit
# refuses with a HeadError naming the mismatch. (The double above runs them on the same code.)
_NO_FIXED_EMBEDDING_FITS = "the check's own data does not match the fixed class embeddings (dimension or labels)"
EXPECTED_FAILED = {name: _NO_FIXED_EMBEDDING_FITS for name in (
    "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object",
    "check_pipeline_consistency", "check_estimators_nan_inf", "check_estimators_pickle",
    "check_f_contiguous_array_estimator", "check_classifier_data_not_an_array", "check_classifiers_classes",
    "check_classifiers_train", "check_supervised_y_2d", "check_decision_proba_consistency",
    "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_fit2d_1sample",
    "check_fit2d_1feature", "check_dict_unchanged", "check_fit_idempotent", "check_fit_check_is_fitted",
    "check_n_features_in", "check_fit2d_predict1d")}


def test_sklearn_checks_of_the_real_estimator_fail_only_where_fixed_embeddings_cannot_fit() -> None:
    """The real estimator, with fixed class embeddings: every check passes except those listed, and
    those fail for the one stated reason (fit refuses data that does not match the embeddings)."""
    results = check_estimator(_fixed(), expected_failed_checks=EXPECTED_FAILED, on_fail=None, on_skip=None)
    statuses = {}
    for r in results:
        statuses.setdefault(r["check_name"], set()).add(r["status"])
        if r["status"] == "xfail":  # the HeadError of fit, itself or as the cause of the check's assertion
            chain = [r["exception"], r["exception"].__cause__, r["exception"].__context__]
            assert any(re.search("class[ _]embedding", str(e)) for e in chain if e), (r["check_name"], r["exception"])
    failed = sorted(n for n, s in statuses.items() if "failed" in s)
    assert failed == [], failed
    unexpectedly_passed = sorted(n for n in EXPECTED_FAILED if statuses.get(n) == {"passed"})
    assert unexpectedly_passed == [], unexpectedly_passed
    assert {"check_estimators_unfitted", "check_get_params_invariance", "check_set_params",
            "check_no_attributes_set_in_init", "check_parameters_default_constructible"} <= {
        n for n, s in statuses.items() if s == {"passed"}}


def test_scores_are_cosine_similarities_to_the_aligned_class_embeddings() -> None:
    emb = {"dog": np.array([0.0, 2.0, 0.0]), "cat": np.array([3.0, 0.0, 0.0]), "car": np.array([0.0, 0.0, 1.0])}
    X = np.array([[1.0, 0.1, 0.0], [0.0, 5.0, 1.0], [0.2, 0.0, 1.0]])
    y = ["cat", "dog", "car"]
    clf = ZeroShotClassifier(class_embeddings=emb, temperature=0.5).fit(X, y)
    assert list(clf.classes_) == ["car", "cat", "dog"]
    np.testing.assert_allclose(clf.class_embeddings_, np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]))
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(clf.decision_function(X), Xn @ clf.class_embeddings_.T)
    assert list(clf.predict(X)) == ["cat", "dog", "car"]
    z = np.exp((Xn @ clf.class_embeddings_.T) / 0.5)
    np.testing.assert_allclose(clf.predict_proba(X), z / z.sum(1, keepdims=True))
    # a lower temperature sharpens the probabilities, never changes the predictions
    sharp = ZeroShotClassifier(class_embeddings=emb, temperature=0.01).fit(X, y)
    assert (sharp.predict_proba(X).max(1) > clf.predict_proba(X).max(1)).all()
    assert list(sharp.predict(X)) == list(clf.predict(X))
    # the parameter is left as given; pickling and cloning keep the behaviour
    assert set(clf.get_params()["class_embeddings"]) == {"dog", "cat", "car"}
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).predict(X), clf.predict(X))
    np.testing.assert_array_equal(clone(clf).fit(X, y).predict_proba(X), clf.predict_proba(X))


def test_prompt_ensembles_classes_of_y_only_and_array_form() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 4)), rng.normal(size=(3, 4))  # two and three prompts
    unit = lambda m: m / np.linalg.norm(m, axis=-1, keepdims=True)  # noqa: E731
    clf = ZeroShotClassifier(class_embeddings={"a": a, "b": b, "unused": np.ones(4)}).fit(np.eye(4)[:2], ["b", "a"])
    assert list(clf.classes_) == ["a", "b"]  # classes of y only, extra embeddings ignored
    np.testing.assert_allclose(clf.class_embeddings_, unit(np.stack([unit(a).mean(0), unit(b).mean(0)])))
    binary = clf.decision_function(rng.normal(size=(5, 4)))
    assert binary.shape == (5,)  # scikit-learn's binary convention: the margin of classes_[1]
    rows = ZeroShotClassifier(class_embeddings=np.stack([a[0], b[0]])).fit(np.eye(4)[:2], [7, 3])
    np.testing.assert_allclose(rows.class_embeddings_, unit(np.stack([a[0], b[0]])))  # rows follow np.unique(y)
    ints = ZeroShotClassifier(class_embeddings={"3": a[0], "7": b[0]}).fit(np.eye(4)[:2], [7, 3])
    np.testing.assert_allclose(ints.class_embeddings_, rows.class_embeddings_)  # str keys serve int labels


@pytest.mark.parametrize("params, y, match", [
    ({}, ["a", "b"], "needs class_embeddings"),
    ({"class_embeddings": {"a": np.ones(3)}}, ["a", "b"], "no embedding for class.*b"),
    ({"class_embeddings": {"a": np.ones(5), "b": np.ones(5)}}, ["a", "b"], "shape \\(5,\\), X has 3 features"),
    ({"class_embeddings": np.ones((3, 3))}, ["a", "b"], "3 rows, y has 2 classes"),
    ({"class_embeddings": {"a": np.ones(3), "b": np.ones(3)}, "temperature": 0}, ["a", "b"], "temperature"),
])
def test_fit_refuses_what_it_cannot_align_with_a_clear_error(params: dict, y: list, match: str) -> None:
    with pytest.raises(HeadError, match=match):
        ZeroShotClassifier(**params).fit(np.eye(3)[:2], y)
    with pytest.raises(NotFittedError):
        ZeroShotClassifier(**params).predict(np.eye(3))


def test_class_prompts_and_their_embeddings() -> None:
    assert class_prompts(["red_disc", "pick-up truck"]) == ["a photo of a red disc.", "a photo of a pick up truck."]
    prompts = class_prompts(["cat"], ["a photo of a {label}.", "a drawing of a {label}."])
    assert prompts == ["a photo of a cat.", "a drawing of a cat."]
    with pytest.raises(HeadError, match="label"):
        class_prompts(["cat"], ["a photo"])
    seen = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.extend(texts)
        return np.arange(len(texts) * 2, dtype=np.float32).reshape(-1, 2)

    emb = text_class_embeddings(["b", "a"], encode, ["x {label}", "y {label}"])
    assert seen == ["x b", "y b", "x a", "y a"] and set(emb) == {"a", "b"}
    np.testing.assert_array_equal(emb["a"], [[4, 5], [6, 7]])


# --------------------------------------------------------------------------- classify on a text space


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("open_clip")
    from support.tiny_clip import embed_tiny_clip

    return embed_tiny_clip(tmp_path_factory.mktemp("clip-zs"))[1]


def test_classify_compares_zeroshot_on_a_space_with_a_text_tower(clip_store: Path, tmp_path: Path) -> None:
    from embedstore.heads import classify, load_head, predict_images

    report = classify(str(clip_store), models=None)
    rows = {r["model"]: r for r in report.results}
    assert "zeroshot" in rows and {"logreg", "knn", "linear-svm"} <= set(rows)
    assert rows["zeroshot"]["params"] == {"temperature": 0.01} and rows["zeroshot"]["val_score"] is None
    assert report.evaluation["zeroshot_prompts"] == ["a photo of a {label}."]
    assert 0 <= rows["zeroshot"]["accuracy"] <= 1
    only = classify(str(clip_store), models=["zeroshot"], protocol="cv", folds=2)
    assert [r["model"] for r in only.results] == ["zeroshot"] and only.protocol == "cv"
    assert only.best["model"] == "zeroshot" and len(only.results[0]["params_per_fold"]) == 2
    # the zero-shot head saves with its space's lineage and predicts new images (skops trusts its class)
    folder = report.save_head(str(tmp_path / "zs"), model="zeroshot")
    head = load_head(folder)
    assert head.model == "zeroshot" and head.classes == ["blue_stripes", "green_square", "red_disc"]
    images = sorted((clip_store.parent / "images" / "val").rglob("*.png"))[:3]
    out = predict_images(head, [str(p) for p in images], device="cpu")
    assert len(out) == 3 and all(r["label"] in head.classes for r in out)


def test_zeroshot_is_refused_on_a_space_without_a_text_tower(tiny_store: Path) -> None:
    from embedstore.heads import classify

    with pytest.raises(HeadError, match="zeroshot head needs a space with a text tower.*open_clip:"):
        classify(str(tiny_store), models=["logreg", "zeroshot"])
    default = classify(str(tiny_store), models=None)
    assert "zeroshot" not in {r["model"] for r in default.results}


def test_cli_classify_shows_zeroshot_by_default_on_a_text_space(clip_store: Path) -> None:
    from click.testing import CliRunner

    from embedstore_cli.main import main

    res = CliRunner().invoke(main, ["classify", str(clip_store), "--models", "all", "--json", "--no-confusion"])
    assert res.exit_code == 0, res.output
    models = [r["model"] for r in json.loads(res.output)["results"]]
    assert "zeroshot" in models and "logreg" in models
    res = CliRunner().invoke(main, ["classify", str(clip_store), "--models", "knn,zeroshot", "--json", "--no-confusion"])
    assert res.exit_code == 0, res.output
    assert [r["model"] for r in json.loads(res.output)["results"]] == ["knn", "zeroshot"]
