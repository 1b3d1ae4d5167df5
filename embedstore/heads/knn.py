"""The FAISS k-nearest-neighbour classifier of the ``knn`` and ``knn-majority`` heads.

Crash safety: pure computation in memory; it writes nothing. The FAISS index is built in ``fit``
and never serialised (pickle and skops drop it; it is rebuilt from the stored vectors on load).
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._vectors import l2_normalize
from ..errors import HeadError

DINO_TEMPERATURE = 0.07
VOTES = ("softmax", "majority")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def vote(sims: np.ndarray, codes: np.ndarray, n_classes: int, how: str,
         temperature: float | None) -> np.ndarray:
    """Class probabilities from the k nearest neighbours of each query (their argmax is the prediction).

    ``how="softmax"`` (DINOv2) weights neighbours by softmax(similarity / temperature);
    ``"majority"`` gives each one vote (``temperature`` unused), ties going to the class with
    the larger summed similarity (shifted by less than 1e-9).
    """
    if how == "softmax":
        weights = _softmax(sims / temperature)
    else:  # one vote each, plus a tie-break below 1e-9 in total: the summed similarity mapped to [0, 1]
        weights = 1.0 + (1e-9 / sims.shape[1]) * (np.asarray(sims, np.float64) + 1.0) / 2.0
    proba = np.zeros((len(sims), n_classes))
    np.add.at(proba, (np.arange(len(sims))[:, None], codes), weights)
    return proba / proba.sum(axis=1, keepdims=True)


def _flat_index(vectors: np.ndarray) -> Any:
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier on cosine similarity, searched with FAISS.

    Vectors are L2-normalised and searched exactly by inner product (``IndexFlatIP``, BLAS
    batched, in blocks of ``block`` queries). ``vote="softmax"`` weights the ``n_neighbors``
    neighbours by softmax(similarity / temperature) as in DINOv2's k-NN evaluation;
    ``vote="majority"`` counts one vote each and ignores ``temperature``. ``n_neighbors`` larger
    than the training set is clamped to it (``n_neighbors_``).
    """

    def __init__(self, n_neighbors: int = 20, temperature: float = DINO_TEMPERATURE, vote: str = "softmax",
                 block: int = 4096):
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.vote = vote
        self.block = block

    def fit(self, X: np.ndarray, y: Sequence) -> "FaissKNNClassifier":
        if self.vote not in VOTES:
            raise HeadError(f"vote must be 'softmax' or 'majority', not {self.vote!r}")
        for name in ("n_neighbors", "block"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise HeadError(f"{name} must be a whole number >= 1, not {value!r}")
        if self.vote == "softmax" and not (isinstance(self.temperature, numbers.Real) and self.temperature > 0):
            raise HeadError(f"temperature must be > 0, not {self.temperature!r}")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        self.train_vectors_ = l2_normalize(X)
        self.train_codes_ = codes.astype(np.int64)
        self.n_neighbors_ = int(min(self.n_neighbors, len(self.train_vectors_)))
        self.index_ = _flat_index(self.train_vectors_)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("index_", None)  # a FAISS index does not pickle; rebuilt in __setstate__
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "train_vectors_" in self.__dict__:
            self.index_ = _flat_index(np.ascontiguousarray(self.train_vectors_, dtype=np.float32))

    def kneighbors(self, X: np.ndarray, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and row numbers of the nearest training vectors, at most as many as exist."""
        check_is_fitted(self)
        Q = l2_normalize(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]))
        k = int(min(n_neighbors or self.n_neighbors_, len(self.train_vectors_)))
        sims, idx = np.empty((len(Q), k), np.float32), np.empty((len(Q), k), np.int64)
        for s in range(0, len(Q), self.block):
            sims[s:s + self.block], idx[s:s + self.block] = self.index_.search(Q[s:s + self.block], k)
        return sims, idx

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        sims, idx = self.kneighbors(X)
        return vote(sims, self.train_codes_[idx], len(self.classes_), self.vote, self.temperature)

    def predict(self, X: np.ndarray) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]
