"""Names offered as choices on the command line (and ``parse_where``, the one reader of --where strings),
free of heavy imports so ``--help`` starts fast and a client of a server imports no faiss.

The modules that implement them import these tuples; tests check that they agree.
Crash safety: constants only; nothing is written.
"""
from __future__ import annotations

from typing import Sequence

from .errors import EmbedOptionError, QueryError

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq", "ivf-pq-refine")
HEADS = ("logreg", "linear-svm", "rbf-svm", "ridge", "knn", "knn-majority", "centroid")
TEXT_HEADS = ("zeroshot",)  # heads that need a space with a text tower (open_clip: backbones); heads.zeroshot
PROTOCOLS = ("auto", "split", "cv")
PREPROCESS = ("l2", "standard", "pca-whiten", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # embed --precision (embedding.embedder)
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")  # embed --runtime (embedding.runtimes)
# the precisions each exported runtime computes in (embedding.onnx); torch takes every one of PRECISIONS
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16")}
STORE_DTYPES = ("float16", "float32")  # embed --dtype: the stored vector type (pipeline.run)
ENGINES = ("local", "ray")  # embed --engine (pipeline.run)
MAX_SHARDS = 99999  # embed --shards / --shard I/N: shard file names hold N in five digits (pipeline.shards)

# Default cosine similarity for near-duplicates (``duplicates`` and the report), from benchmarks/duplicates.py.
DUPLICATES_THRESHOLD = 0.825

# search --where KEY=VALUE: the columns a search filters on (search.rows)
WHERE_KEYS = ("label", "split", "path")


def parse_where(where: str | Sequence[str] | None) -> dict[str, str]:
    """``["label=cat", "split=val"]`` -> ``{"label": "cat", "split": "val"}`` (all must hold): the
    CLI's ``--where`` strings, as :func:`embedstore.search.search` takes them. ``path=PREFIX``
    keeps the images whose stored path starts with PREFIX."""
    if not where:
        return {}
    out = {}
    for clause in [where] if isinstance(where, str) else where:
        key, sep, value = clause.partition("=")
        if not sep or key.strip() not in WHERE_KEYS:
            raise QueryError(f"cannot read --where {clause!r}: use label=NAME or split=NAME (or path=PREFIX)")
        out[key.strip()] = value.strip()
    return out


def check_runtime_precision(runtime: str, precision: str) -> None:
    """Refuse a ``precision`` that the exported ``runtime`` does not compute in (``auto`` always passes)."""
    have = RUNTIME_PRECISIONS.get(runtime)
    if have is not None and precision != "auto" and precision not in have:
        raise EmbedOptionError(f"precision {precision!r} is not one {runtime} computes in here ({', '.join(have)}): "
                               "leave --precision auto, or use --runtime torch")
