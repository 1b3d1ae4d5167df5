"""Curation over a space: label issues (out-of-fold probabilities ranked by cleanlab), outliers
(k-NN distance) and leaks between splits (cross-split near-duplicates).

Modules: ``labels`` (``ProtocolHead``, ``out_of_fold_proba``, cleanlab's ``find_label_issues``),
``outliers`` (mean k-NN cosine distance), ``leaks`` (cross-split pairs of the k-NN graph),
``records`` (the per-image record the sections list) and ``run`` (``audit``, ``AuditReport``).

Crash safety: the store is only read; the one file written is the k-NN graph cache that
``duplicates`` keeps (each batch atomically, :mod:`embedstore.search.graph`).
"""
from __future__ import annotations

from .labels import ProtocolHead, out_of_fold_proba, find_issues
from .run import audit, AuditReport, DEFAULT_TOP

__all__ = ["ProtocolHead", "out_of_fold_proba", "find_issues", "audit", "AuditReport", "DEFAULT_TOP"]
