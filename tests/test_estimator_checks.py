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
