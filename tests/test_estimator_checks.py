"""scikit-learn's estimator checks over every classifier the project defines over vectors.

The calibrated heads are scikit-learn's own ``CalibratedClassifierCV(method="temperature")`` and the
centroid head is scikit-learn's ``NearestCentroid``; the FAISS k-NN classifier is embedstore's.
"""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedstore.heads import FaissKNNClassifier


@parametrize_with_checks([FaissKNNClassifier(), FaissKNNClassifier(vote="majority")])
def test_sklearn_estimator_checks(estimator, check) -> None:
    check(estimator)


def test_n_neighbors_beyond_the_training_rows_is_clamped() -> None:
    """An absurd n_neighbors searches the rows there are: no allocation of that size."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 8)), np.repeat(["a", "b", "c"], 4)
    knn = FaissKNNClassifier(n_neighbors=10 ** 12).fit(X, y)
    assert knn.n_neighbors_ == 12
    sims, idx = knn.kneighbors(X[:3], 10 ** 15)
    assert sims.shape == idx.shape == (3, 12)
    assert np.allclose(knn.predict_proba(X).sum(1), 1)


@pytest.mark.parametrize("bad", [{"n_neighbors": 0}, {"n_neighbors": 2.5}, {"temperature": 0.0}, {"vote": "mean"}])
def test_bad_parameters_are_refused_in_fit(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        FaissKNNClassifier(**bad).fit(np.eye(3), ["a", "b", "c"])


def test_fitted_state_survives_pickle_and_the_index_is_rebuilt() -> None:
    import pickle

    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 5)), np.repeat(["x", "y", "z"], 10)
    knn = FaissKNNClassifier(n_neighbors=3).fit(X, y)
    again = pickle.loads(pickle.dumps(knn))
    np.testing.assert_array_equal(again.predict(X), knn.predict(X))
    assert "index_" not in knn.__getstate__()


# --------------------------------------------------------------------------- EmbeddingTransformer (image paths in)


def _files(collection, split: str) -> tuple[list[str], list[str]]:
    paths = sorted((collection / split).rglob("*.png"))
    return [str(p) for p in paths], [p.parent.name for p in paths]


def _transformer(**params):
    from imagegen import TINY_BACKBONE

    from embedstore import EmbeddingTransformer

    return EmbeddingTransformer(backbone=TINY_BACKBONE, weights="random", workers=0, **params)


def test_transformer_clone_and_params_round_trip() -> None:
    from sklearn.base import clone

    t = _transformer(batch_size=7, on_error="nan")
    params = t.get_params()
    assert params["batch_size"] == 7 and params["on_error"] == "nan" and params["weights"] == "random"
    copy = clone(t)
    assert copy is not t and copy.get_params() == params
    assert copy.set_params(batch_size=3) is copy and copy.get_params()["batch_size"] == 3
    assert t.get_params()["batch_size"] == 7  # the original is untouched
    assert type(t)(**params).get_params() == params


def test_transformer_is_not_fitted_until_fit(collection) -> None:
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    t = _transformer()
    paths, _ = _files(collection, "val")
    with pytest.raises(NotFittedError):
        t.transform(paths[:2])
    with pytest.raises(NotFittedError):
        check_is_fitted(t)
    assert not [k for k in vars(t) if k.endswith("_")]  # no fitted state before fit
    assert t.fit(paths) is t
    check_is_fitted(t)
    X = t.transform(paths)
    assert X.shape == (len(paths), t.n_features_out_) and X.dtype == np.float32 and np.isfinite(X).all()
    assert len(t.get_feature_names_out()) == t.n_features_out_
    with pytest.raises(NotFittedError):  # a clone carries the parameters, not the fitted state
        clone(t).transform(paths[:1])


@pytest.mark.parametrize("bad", [{"on_error": "skip"}, {"batch_size": 0}])
def test_transformer_refuses_bad_parameters_in_fit(bad: dict) -> None:
    from embedstore.errors import EmbedstoreError

    t = _transformer(**bad)  # the constructor only stores them (scikit-learn's rule)
    with pytest.raises(EmbedstoreError, match=next(iter(bad))) as info:
        t.fit([])
    assert isinstance(info.value, ValueError)


def test_transformer_in_a_pipeline_and_grid_search(collection) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer

    X_train, y_train = _files(collection, "train")
    X_val, y_val = _files(collection, "val")
    pipe = Pipeline([("embed", _transformer()), ("l2", Normalizer()), ("clf", LogisticRegression(max_iter=2000))])
    search = GridSearchCV(pipe, {"clf__C": [0.1, 10.0], "embed__batch_size": [4, 64]}, cv=2)
    search.fit(X_train, y_train)
    assert set(search.best_params_) == {"clf__C", "embed__batch_size"}
    assert len(search.cv_results_["params"]) == 4 and np.isfinite(search.cv_results_["mean_test_score"]).all()
    best = search.best_estimator_
    assert best.named_steps["embed"].n_features_out_ > 0
    assert (best.predict(X_val) == np.array(y_val)).mean() >= 0.8
