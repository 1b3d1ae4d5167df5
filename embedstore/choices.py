"""Names offered as choices on the command line, free of heavy imports so ``--help`` starts fast.

The modules that implement them import these tuples; tests check that they agree.
Crash safety: constants only; nothing is written.
"""
from __future__ import annotations

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf-flat", "ivf-pq", "ivf-pq-refine")
HEADS = ("logreg", "linear-svm", "rbf-svm", "ridge", "knn", "knn-majority", "centroid")
PROTOCOLS = ("auto", "split", "cv")
PREPROCESS = ("l2", "standard", "pca-whiten", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # embed --precision (embedding.embedder)
STORE_DTYPES = ("float16", "float32")  # embed --dtype: the stored vector type (pipeline.run)
ENGINES = ("local", "ray")  # embed --engine (pipeline.run)
MAX_SHARDS = 99999  # embed --shards / --shard I/N: shard file names hold N in five digits (pipeline.shards)

# Default cosine similarity for near-duplicates (``duplicates`` and the report), from benchmarks/duplicates.py.
DUPLICATES_THRESHOLD = 0.825
