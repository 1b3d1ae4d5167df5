"""Consistency rules of store files, checked as a file is read and before vectors are written.

Crash safety: nothing here writes. A file that breaks a rule is refused whole, with one
``StoreError`` naming the file and the damaged dataset, so a damaged file can never shift vectors
onto the wrong images or feed NaN to a head: readers stop, and the fix (restore, or re-embed)
is in the message.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidNameError, StoreError

_NAME_RE = re.compile(r"^[A-Za-z0-9._+-]{1,128}$")
BAD_VECTOR = "BadVector"
FIX = "the file is damaged: restore it from a backup, or move it aside and run `embedstore embed` again"


def validate_space_name(name: Any) -> str:
    """Return ``name`` if it is one safe path component; raise ``InvalidNameError`` otherwise.

    A space name becomes an HDF5 group (``spaces/<name>``) and folder names
    (``STORE.finetune/<name>``, ``STORE.index/<name>.*``): letters, digits and ``. _ + -``,
    1 to 128 characters, not ``.`` or ``..``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise InvalidNameError(
            f"invalid space name {name!r}: use 1 to 128 letters, digits or . _ + - (one name, not a path), "
            "e.g. --space resnet50-ft"
        )
    return name


_BITS = {2: (np.uint16, 0x7C00, 0x7FFF), 4: (np.uint32, 0x7F800000, 0x7FFFFFFF),
         8: (np.uint64, 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF)}  # IEEE 754: exponent, all but the sign


def _finite_nonzero(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: all values finite, and some value not zero. On the IEEE bits for float arrays (numpy's
    float16 ufuncs are emulated: ten times slower than these integer tests)."""
    if v.dtype.kind == "f" and v.dtype.itemsize in _BITS and v.ndim == 2:
        kind, exponent, magnitude = _BITS[v.dtype.itemsize]
        u = np.ascontiguousarray(v).view(kind)
        return (u & kind(exponent) != kind(exponent)).all(axis=1), (u & kind(magnitude) != 0).any(axis=1)
    return np.isfinite(v).all(axis=1), v.any(axis=1)


def vector_problems(vectors: np.ndarray, block: int = 16384) -> dict[int, str]:
    """Rows whose vector cannot be used (NaN/Inf values, all zeros) -> why; checked block by block."""
    out: dict[int, str] = {}
    for start in range(0, len(vectors), block):
        v = np.asarray(vectors[start:start + block])
        finite, nonzero = _finite_nonzero(v)
        for i in np.flatnonzero(~(finite & nonzero)).tolist():
            out[start + i] = ("the embedding has NaN or Inf values" if not finite[i]
                              else "the embedding is all zeros (no direction)")
    return out


def journal_seq(path: Path, attrs: dict[str, Any]) -> int:
    """The ``journal_seq`` attribute of a store file (0 when absent), refusing anything but an integer >= 0."""
    seq = attrs.get("journal_seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 0:
        raise StoreError(f"{path}: attribute journal_seq is {seq!r}, not a non-negative integer; {FIX}")
    return int(seq)


def check_rows(path: Path, where: str, rows: np.ndarray, n_images: int) -> None:
    """Refuse row ids of a space (``where``) that are not distinct ids into the images table."""
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise StoreError(f"{path}: {where}/rows is {rows.dtype} of shape {rows.shape}, not a 1-D integer array; {FIX}")
    if len(rows):
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= n_images:
            raise StoreError(f"{path}: {where}/rows holds row ids from {lo} to {hi}, outside the images table "
                             f"(rows 0 to {n_images - 1}); {FIX}")
        uniq, counts = np.unique(rows, return_counts=True)
        if len(uniq) != len(rows):
            raise StoreError(f"{path}: {where}/rows holds {int((counts > 1).sum())} row id(s) more than once "
                             f"(e.g. {int(uniq[counts > 1][0])}); {FIX}")


def check_file(path: Path, attrs: dict[str, Any], images: dict[str, np.ndarray], failures: dict[str, np.ndarray],
               spaces: dict[str, tuple[dict[str, Any], np.ndarray, Any]]) -> None:
    """Refuse a store file read whole (a journal part) whose datasets contradict each other."""
    def damaged(what: str) -> StoreError:
        return StoreError(f"{path}: {what}; {FIX}")

    journal_seq(path, attrs)
    for group, cols in (("images", images), ("failures", failures)):
        lengths = {c: np.shape(a) for c, a in cols.items()}
        for c, shape in lengths.items():
            if len(shape) != 1:
                raise damaged(f"{group}/{c} has shape {shape}, not one value per row")
        if len({s[0] for s in lengths.values()}) > 1:
            shown = ", ".join(f"{group}/{c} has {s[0]}" for c, s in lengths.items())
            raise damaged(f"the {group} columns have different lengths ({shown})")
    n_images = len(images["path"]) if "path" in images else 0
    for sname, (sattrs, rows, vectors) in spaces.items():
        where = f"spaces/{sname}"
        if vectors.ndim != 2 or vectors.dtype.kind != "f":
            raise damaged(f"{where}/vectors is {vectors.dtype} of shape {vectors.shape}, not a 2-D float array")
        check_rows(path, where, rows, n_images)
        if len(rows) != len(vectors):
            raise damaged(f"{where}/rows has {len(rows)} entries but {where}/vectors has {len(vectors)} rows")
        dim = sattrs.get("dim")
        if dim is not None and dim != vectors.shape[1]:
            raise damaged(f"{where} has attribute dim={dim!r} but its vectors have {vectors.shape[1]} columns")
        bad = sorted(vector_problems(vectors))
        if bad:
            raise StoreError(
                f"{path}: {where}/vectors has {len(bad)} vector(s) with NaN/Inf values or all zeros (e.g. row "
                f"{int(rows[bad[0]])}); {FIX}"
            )


def check_space_compatible(old: dict[str, Any], new: dict[str, Any], name: str) -> None:
    """Refuse to mix vectors of different backbones or weights in one space.

    The inference runtime is not part of a space's identity (backbone, weights and preprocessing
    are): ONNX Runtime's and OpenVINO's vectors agree with eager torch fp32 per image to a cosine of
    0.999 or better in fp32 and 0.99 in bf16, as torch's own bf16 autocast does (checked before a
    runtime is used, embedding.runtimes), so a space takes the
    vectors of any runtime; :func:`merge_runtimes` keeps the list of runtimes used."""
    for key in ("backbone", "weights_sha256", "dim"):
        if old.get(key) != new.get(key):
            raise StoreError(
                f"space {name!r} holds {key}={old.get(key)!r} but this run has {key}={new.get(key)!r}: "
                "choose another space name with --space NAME"
            )


def merge_runtimes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The attributes that change when ``new``'s vectors join a space with ``old``'s: ``runtimes`` (every
    runtime that added vectors, in order) and ``runtime_min_cosine`` (the lowest validated); {} if none."""
    if not new.get("runtime"):
        return {}
    have = list(old.get("runtimes") or ([old["runtime"]] if old.get("runtime") else []))
    if not have and old.get("precision"):  # a space from before runtimes were recorded: eager torch
        version = str((old.get("versions") or {}).get("torch", "")).split("+")[0]
        have = [" ".join(p for p in ("torch", version, str(old["precision"])) if p)]
    out: dict[str, Any] = {}
    added = [r for r in (new.get("runtimes") or [new["runtime"]]) if r not in have]
    if added:
        out["runtimes"] = have + added
    lows = [c for c in (old.get("runtime_min_cosine"), new.get("runtime_min_cosine")) if c is not None]
    if lows and min(lows) != old.get("runtime_min_cosine"):
        out["runtime_min_cosine"] = min(lows)
    return out
