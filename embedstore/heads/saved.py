"""Saved classifier heads: a fitted head plus the lineage of the space it was trained on.

A head folder holds two files::

    head.json    manifest: format, space lineage (backbone, weights checksum, preprocessing,
                 dim, dtype), class names, model, hyper-parameters, metrics, payload sha256
    head.skops   the fitted scikit-learn pipeline in skops format (no pickle)

Loading never executes code from the folder: the payload's sha256 must match the manifest
(a changed or swapped file is refused), and skops only builds scikit-learn, NumPy and SciPy
objects plus the classes listed in :data:`TRUSTED` (the FAISS k-NN and zero-shot classifiers and
scikit-learn's temperature-scaling internals). A head refuses vectors from another space (other backbone,
weights or dimension). A manifest missing a field, or a payload that is not a file, is one
:class:`HeadError` naming the file and the fix (save the head again), before anything is loaded.

Crash safety: payload first, manifest last, each written to a temporary file and renamed into
place, so a crash leaves the previous head or none, never a manifest paired with another payload.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .._atomic import atomic_write_bytes
from .._hashing import sha256_bytes
from ..errors import HeadError
from ..store import Space
from .rows import CHUNK, iter_vectors

__all__ = ["HEAD_FORMAT", "Head", "HeadError", "load_head", "predict_images", "save_head"]

# /2: k-NN heads take n_neighbors and temperature scaling is scikit-learn's (/1 heads held
# embedstore.classify.SoftmaxCalibrated, which no longer exists)
HEAD_FORMAT = "embedstore-head/2"
MANIFEST = "head.json"
PAYLOAD = "head.skops"
TRUSTED = ("embedstore.heads.knn.FaissKNNClassifier", "embedstore.heads.zeroshot.ZeroShotClassifier",
           "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._TemperatureScaling")
LINEAGE_KEYS = ("backbone", "weights", "weights_sha256", "preprocessing", "pooling", "dim", "dtype")
_SPACE_KEYS = ("backbone", "weights_sha256", "dim")
# manifest fields that loading and predicting read, with the type each must have
_REQUIRED = {"space": str, "lineage": dict, "model": str, "classes": list, "payload_sha256": str}


@dataclass
class Head:
    """A fitted classifier head bound to one embedding space."""

    estimator: Any  # a fitted scikit-learn Pipeline with predict_proba
    space: str
    lineage: dict[str, Any]
    model: str
    classes: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    preprocess: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def check_space(self, attrs: dict[str, Any], where: str = "these vectors") -> None:
        """Raise :class:`HeadError` unless ``attrs`` describe the space this head was trained on."""
        for key in _SPACE_KEYS:
            if str(attrs.get(key)) != str(self.lineage.get(key)):
                raise HeadError(
                    f"{where} come from another space ({key}={_short(attrs.get(key))}) than head "
                    f"{self.path or self.space} ({key}={_short(self.lineage.get(key))}): embed the images with "
                    f"`embedstore embed FOLDER --store FILE.h5 --backbone {self.lineage.get('backbone')}` "
                    "and the same weights, or train a head on that space with `embedstore classify`"
                )

    def _vectors(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        dim = int(self.lineage["dim"])
        if X.ndim != 2 or X.shape[1] != dim:
            raise HeadError(f"head {self.path or self.space} takes ({dim},) vectors of space {self.space!r}, "
                            f"not an array of shape {X.shape}")
        # round through the store's dtype so new vectors match what the head was trained on
        return X.astype(self.lineage.get("dtype") or "float32").astype(np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, n_classes) probabilities, columns in the order of :attr:`classes`."""
        return self.estimator.predict_proba(self._vectors(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted class names of vectors of this head's space."""
        return np.asarray(self.estimator.predict(self._vectors(X)), dtype=object)

    def top_k(self, X: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """The k most probable (class, probability) pairs of each vector, best first."""
        proba = self.predict_proba(X)
        k = max(1, min(int(k), proba.shape[1]))  # never more pairs than there are classes
        order = np.argsort(-proba, axis=1)[:, :k]
        return [[(self.classes[j], float(proba[i, j])) for j in row] for i, row in enumerate(order)]

    def iter_space(self, space: Space, positions: np.ndarray | None = None, *, where: str | None = None,
                   chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, probabilities) chunk by chunk over a store's space, after checking it is this head's space.

        ``positions=None`` streams every vector; else only ``positions`` are read (indices are into
        ``positions``). Each chunk is read in the stored dtype and converted on its own, so memory
        stays at one chunk whatever the space's size.
        """
        self.check_space(space.attrs, where or f"the vectors of space {space.name!r}")
        for at, X in iter_vectors(space, positions, chunk=chunk):
            yield at, self.predict_proba(X)

    def predict_space(self, space: Space, where: str | None = None, positions: np.ndarray | None = None,
                      chunk: int = CHUNK) -> np.ndarray:
        """Predicted class names of a store's space (or of its ``positions`` only), chunk by chunk,
        after checking it is this head's space."""
        self.check_space(space.attrs, where or f"the vectors of space {space.name!r}")
        out = np.empty(len(space) if positions is None else len(np.asarray(positions).reshape(-1)), dtype=object)
        for at, X in iter_vectors(space, positions, chunk=chunk):
            out[at] = self.predict(X)
        return out


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] if len(s) == 64 else s


def lineage_of(space: Space) -> dict[str, Any]:
    """The facts of a space that a head needs to embed new images the same way."""
    out = {k: space.attrs.get(k) for k in LINEAGE_KEYS}
    out["dtype"] = out["dtype"] or str(space.vectors.dtype)
    return out


def save_head(
    folder: str | os.PathLike,
    estimator: Any,
    *,
    space: Space,
    model: str,
    params: dict[str, Any] | None = None,
    preprocess: str = "",
    metrics: dict[str, Any] | None = None,
    store: str | None = None,
    n_train: int | None = None,
) -> Path:
    """Write a fitted head with its space's lineage to ``folder`` (created if needed).

    The payload is written first and the manifest, which records the payload's sha256, last,
    each by an atomic rename, so a reader never pairs a manifest with another payload.
    """
    import sklearn
    import skops
    import skops.io as sio

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HeadError(f"{folder} is a file: --save-head takes a folder (it will hold {MANIFEST} and {PAYLOAD})")
    folder.mkdir(parents=True, exist_ok=True)
    payload = sio.dumps(estimator)
    manifest = {
        "format": HEAD_FORMAT,
        "space": space.name,
        "lineage": lineage_of(space),
        "model": model,
        "classes": [str(c) for c in estimator.classes_],
        "params": params or {},
        "preprocess": preprocess,
        "metrics": metrics or {},
        "store": store,
        "n_train": n_train,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"scikit-learn": sklearn.__version__, "skops": skops.__version__, "numpy": np.__version__},
        "payload": PAYLOAD,
        "payload_sha256": sha256_bytes(payload),
    }
    _atomic_write(folder / PAYLOAD, payload)
    _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())
    return folder


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except PermissionError as e:
        raise HeadError(f"cannot write {path} ({e.strerror}): choose a writable folder for --save-head") from e


def load_head(folder: str | os.PathLike) -> Head:
    """Load a head saved by :func:`save_head`, refusing a changed payload or untrusted types."""
    import skops.io as sio

    folder = Path(folder)
    mpath = folder / MANIFEST if folder.is_dir() else folder
    if not mpath.is_file():
        raise HeadError(f"no head at {folder}: expected {folder / MANIFEST}; save one with "
                        "`embedstore classify FILE.h5 --save-head DIR`")
    folder = mpath.parent
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise HeadError(f"{mpath} is not a readable head manifest ({e}): save the head again") from e
    except OSError as e:
        raise HeadError(f"cannot read {mpath} ({e.strerror or e}): check its permissions") from None
    _check_manifest(manifest, mpath)
    ppath = folder / PAYLOAD
    try:
        payload = ppath.read_bytes()
    except FileNotFoundError:
        raise HeadError(f"{ppath} is missing: the head folder is incomplete; save the head again with "
                        f"`embedstore classify STORE.h5 --save-head {folder}`") from None
    except IsADirectoryError:
        raise HeadError(f"{ppath} is a folder, not a head payload file: the head folder is damaged; save the head "
                        f"again with `embedstore classify STORE.h5 --save-head {folder}`") from None
    except OSError as e:
        raise HeadError(f"cannot read {ppath} ({e.strerror or e}): check its permissions, or save the head again "
                        f"with `embedstore classify STORE.h5 --save-head {folder}`") from None
    if sha256_bytes(payload) != manifest["payload_sha256"]:
        raise HeadError(f"{ppath} does not match the sha256 recorded in {mpath}: the file was changed or swapped; "
                        "it was not loaded. Save the head again from its store")
    try:
        untrusted = sio.get_untrusted_types(data=payload)
    except Exception as e:  # noqa: BLE001 - a corrupt payload is one clear error
        raise HeadError(f"{ppath} is not a readable skops file ({type(e).__name__}: {e}): save the head again") from e
    foreign = sorted(set(untrusted) - set(TRUSTED))
    if foreign:
        raise HeadError(f"{ppath} holds types that embedstore does not load ({', '.join(foreign)}): "
                        "it was not written by `embedstore classify`; refusing to load it")
    try:
        estimator = sio.loads(payload, trusted=list(untrusted))
    except Exception as e:  # noqa: BLE001
        raise HeadError(f"{ppath} cannot be loaded ({type(e).__name__}: {e}): save the head again") from e
    classes = [str(c) for c in getattr(estimator, "classes_", [])]
    if classes != manifest.get("classes") or not hasattr(estimator, "predict_proba"):
        raise HeadError(f"{ppath} does not fit its manifest {mpath} (classes differ or no predict_proba): "
                        "save the head again")
    return Head(estimator=estimator, space=manifest["space"], lineage=manifest["lineage"], model=manifest["model"],
                classes=classes, params=manifest.get("params", {}), preprocess=manifest.get("preprocess", ""),
                metrics=manifest.get("metrics", {}), path=folder)


def _check_manifest(manifest: Any, mpath: Path) -> None:
    """Refuse a manifest of another format or missing a field that loading or predicting reads."""
    fix = f"save the head again with `embedstore classify STORE.h5 --save-head {mpath.parent}`"
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found == "embedstore-head/1":
        raise HeadError(f"{mpath} is a head saved by an older embedstore (format {found!r}, this one reads "
                        f"{HEAD_FORMAT!r}): {fix}")
    if found != HEAD_FORMAT:
        raise HeadError(f"{mpath} is not an embedstore head (format {found!r}, expected {HEAD_FORMAT!r}): {fix}")
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            what = "has no" if key not in manifest else f"has a {type(manifest[key]).__name__}, not a {kind.__name__}, as"
            raise HeadError(f"{mpath} {what} {key!r}: the manifest is incomplete or was edited; {fix}")
    lineage = manifest["lineage"]
    missing = [k for k in LINEAGE_KEYS if k not in lineage]
    if missing:
        raise HeadError(f"{mpath}: its lineage lacks {', '.join(missing)}: the manifest is incomplete or was edited; "
                        f"{fix}")
    try:
        dim = int(lineage["dim"])
    except (TypeError, ValueError):
        dim = 0
    if dim < 1:
        raise HeadError(f"{mpath}: its lineage has dim={lineage['dim']!r}, not a vector size: {fix}")


def predict_images(
    head: str | os.PathLike | Head,
    images: Sequence[str | os.PathLike],
    *,
    top_k: int = 3,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = 0,
) -> list[dict[str, Any]]:
    """Embed image files with the head's recorded backbone and predict their labels, end to end.

    Args:
        head: a head folder (or a loaded :class:`Head`).
        images: image files and/or folders (searched recursively).
        top_k: how many (label, probability) pairs to return per image.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        batch_size: images per forward pass.
        workers: decode worker processes (0: in this process).

    Returns one dict per image: ``image``, ``label``, ``probability``, ``top`` (list of
    ``{"label", "p"}``), or ``image`` and ``error`` when the file cannot be read. The
    backbone is refused if its weights checksum differs from the head's lineage.
    """
    from ..backbones.load import load_space_backbone
    from ..data.collection import expand_images
    from ..embedding.embedder import Embedder, embed_items

    h = head if isinstance(head, Head) else load_head(head)
    files = expand_images(images)
    bb = load_space_backbone(h.lineage)  # BackboneError when the weights here differ from the lineage
    vectors, results = embed_items(files, Embedder(bb, device=device), batch_size, workers)
    errors = {r.index: f"{r.error}: {r.message}" for r in results if r.error}
    ok = [i for i in range(len(files)) if i not in errors]
    tops = h.top_k(vectors[ok], top_k) if ok else []
    out: list[dict[str, Any]] = [{} for _ in files]
    for i, top in zip(ok, tops):
        out[i] = {"image": files[i].rel, "label": top[0][0], "probability": round(top[0][1], 4),
                  "top": [{"label": lab, "p": round(p, 4)} for lab, p in top]}
    for i, err in errors.items():
        out[i] = {"image": files[i].rel, "error": err}
    return out
