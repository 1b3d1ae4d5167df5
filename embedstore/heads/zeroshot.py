"""The zero-shot head: each class is the text embedding of prompts naming it ("a photo of a {label}."),
and an image is scored by cosine similarity to them. No labelled image is needed; ``classify``
puts it beside the trained heads of a CLIP space to show what labelled data buys.

The estimator takes the class embeddings as a parameter (computed outside, by a space's text
tower: :func:`embedstore.embedding.text.embed_texts`), so it imports neither torch nor open_clip
and saves like any head. ``fit`` only records the classes of ``y`` and aligns their embeddings.

Crash safety: pure computation in memory; nothing here writes a file.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._vectors import l2_normalize
from ..errors import HeadError

ZEROSHOT = "zeroshot"  # its name in the model grid (choices.TEXT_HEADS)
DEFAULT_TEMPLATES = ("a photo of a {label}.",)
CLIP_TEMPERATURE = 0.01  # CLIP's learned logit scale, 100, as a softmax temperature


def class_prompts(labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Every template filled with every label (label-major): ``_`` and ``-`` in labels become spaces."""
    if isinstance(templates, str) or not templates or any("{label}" not in t for t in templates):
        raise HeadError(f"templates must be a list of strings holding '{{label}}', e.g. {list(DEFAULT_TEMPLATES)}, "
                        f"not {templates!r}")
    names = [" ".join(str(label).replace("_", " ").replace("-", " ").split()) for label in labels]
    return [t.format(label=n) for n in names for t in templates]


def text_class_embeddings(labels: Sequence[Any], encode: Callable[[list[str]], np.ndarray],
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict[str, np.ndarray]:
    """``{label: (len(templates), dim) array}``: the prompts of each label encoded by ``encode``
    (texts -> vectors, e.g. ``lambda t: embed_texts(space, t)``); the classifier averages them."""
    labels = [str(label) for label in labels]
    vectors = np.asarray(encode(class_prompts(labels, templates)), np.float32)
    per = len(templates)
    return {label: vectors[i * per:(i + 1) * per] for i, label in enumerate(labels)}


def align_class_embeddings(given: Any, classes: np.ndarray, dim: int) -> np.ndarray:
    """(len(classes), dim) unit rows: each class's embedding (its prompts' unit vectors averaged, then
    normalised), in the order of ``classes``; HeadError naming what is missing or of the wrong shape."""
    if given is None:
        raise HeadError("ZeroShotClassifier needs class_embeddings: the text embeddings of each class's "
                        "prompts, e.g. text_class_embeddings(labels, lambda t: embed_texts(space, t))")
    if isinstance(given, Mapping):
        missing = [c for c in classes if c not in given and str(c) not in given]
        if missing:
            raise HeadError(f"class_embeddings has no embedding for class(es) {', '.join(map(str, missing[:5]))}"
                            f"{' ...' if len(missing) > 5 else ''} of y: give one for every class "
                            f"(it has {', '.join(map(str, list(given)[:5]))}{' ...' if len(given) > 5 else ''})")
        blocks = [given[c] if c in given else given[str(c)] for c in classes]
    else:
        blocks = list(np.asarray(given, dtype=np.float64))
        if len(blocks) != len(classes):
            raise HeadError(f"class_embeddings holds {len(blocks)} rows, y has {len(classes)} classes: give "
                            "one per class in the order of np.unique(y), or a dict {label: vector}")
    rows = []
    for c, block in zip(classes, blocks):
        b = np.atleast_2d(np.asarray(block, dtype=np.float64))
        if b.ndim != 2 or b.shape[1] != dim or not b.size or not np.isfinite(b).all():
            raise HeadError(f"the class embedding of {str(c)!r} has shape {np.shape(block)}, X has {dim} features: "
                            "give vectors of the space the images were embedded in (its text tower)")
        rows.append(l2_normalize(b, np.float64).mean(0))
    return l2_normalize(np.stack(rows), np.float64)


class ZeroShotClassifier(ClassifierMixin, BaseEstimator):
    """Classify vectors by cosine similarity to fixed class embeddings (CLIP zero-shot).

    Args:
        class_embeddings: ``{label: vector}`` or ``{label: (n_prompts, dim) array}`` (prompt
            ensembling: the unit prompt vectors are averaged, then normalised again), e.g. from
            :func:`text_class_embeddings`; or an array of one row (or one block of rows) per class,
            in the order of ``np.unique(y)``. Every class of ``y`` needs one, of ``X``'s dimension.
        temperature: softmax temperature of ``predict_proba`` over the cosine similarities
            (0.01: CLIP's logit scale of 100). The predictions do not depend on it.

    ``fit`` learns nothing from the vectors: it records ``classes_`` (those of ``y``) and
    ``class_embeddings_`` (their embeddings, unit rows, in the order of ``classes_``).
    """

    def __init__(self, class_embeddings: Mapping[Any, Any] | np.ndarray | None = None,
                 temperature: float = CLIP_TEMPERATURE):
        self.class_embeddings = class_embeddings
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: Sequence) -> "ZeroShotClassifier":
        if not (isinstance(self.temperature, numbers.Real) and not isinstance(self.temperature, bool)
                and self.temperature > 0):
            raise HeadError(f"temperature must be > 0, not {self.temperature!r}")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        self.class_embeddings_ = align_class_embeddings(self._given(X, y), self.classes_, X.shape[1])
        return self

    def _given(self, X: np.ndarray, y: np.ndarray) -> Any:
        """The class embeddings to align: the parameter (X and y are not read: nothing is learned from them)."""
        return self.class_embeddings

    def similarities(self, X: np.ndarray) -> np.ndarray:
        """Cosine similarity of each row of X to each class embedding, (n, n_classes)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return l2_normalize(X, np.float64) @ self.class_embeddings_.T

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Cosine similarities, (n, n_classes); with two classes, scikit-learn's (n,) margin of ``classes_[1]``."""
        sims = self.similarities(X)
        return sims[:, 1] - sims[:, 0] if len(self.classes_) == 2 else sims

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.similarities(X) / self.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        sims = self.similarities(X)  # checks that it is fitted first
        return self.classes_[sims.argmax(1)]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        # Nothing is learned from X: scored on data unrelated to the class embeddings, accuracy is chance.
        tags.classifier_tags.poor_score = True
        return tags
