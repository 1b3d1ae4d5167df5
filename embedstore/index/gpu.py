"""Faiss on a GPU: whether faiss's GPU build sees one, the ``--device`` choice, and moving an index there.

Crash safety: in-memory only; nothing here writes a file.
"""
from __future__ import annotations

from typing import Any

import faiss

from ..errors import IndexBuildError
from .checks import faiss_message


def faiss_gpus() -> int:
    """GPUs usable by faiss: 0 unless faiss's GPU build is installed (``pip install -e ".[gpu]"``)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def resolve_faiss_device(device: str = "auto") -> str:
    """``cuda`` or ``cpu``: where faiss builds for a ``--device`` of auto, cpu or cuda."""
    if device == "auto":
        return "cuda" if faiss_gpus() else "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not faiss_gpus():
            raise IndexBuildError("--device cuda needs faiss's GPU build and a visible GPU: `pip install -e .[gpu]` "
                                  "in a checkout (faiss-gpu-cu12), or use --device cpu")
        return "cuda"
    raise IndexBuildError(f"device must be auto, cpu or cuda, not {device!r}")


def to_gpu(index: faiss.Index, notes: list[str]) -> tuple[faiss.Index, Any]:
    """The index on GPU 0; else the CPU index with its k-means on the GPU; else as it is."""
    res = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(res, 0, index), res
    except (RuntimeError, AttributeError) as e:
        reason = faiss_message(e)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(ivf.d))
            notes.append(f"k-means ran on the GPU; this index type is filled on the CPU ({reason})")
            return index, res
        notes.append(f"this index type has no GPU version: built on the CPU ({reason})")
        return index, None

