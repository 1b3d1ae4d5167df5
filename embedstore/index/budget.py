"""The whole-process memory budget of an index build (autofaiss's ``max_index_memory_usage`` and
``current_memory_available`` in one number): which index, how large a training sample and how
large a chunk of added vectors fit beside what the process already holds.

``memory`` bounds the process: its resident memory now (``psutil``: the interpreter, faiss, the
open store) + the finished index + the training sample (the rows read in the stored dtype and
the float32 copies faiss makes of them: normalised, rotated by OPQ, residuals) + one chunk of
added vectors (read, normalised, and faiss's own copy). The sample is what faiss's guidance asks
for (64 vectors per inverted list, 65536 at least), shrunk toward its minimum (39 per centroid)
when the budget is tight; the chunk shrinks from 32768 rows to 1024. A budget that cannot hold
even the smallest index is an ``IndexBuildError`` naming the numbers and the fix.

Crash safety: pure choices; nothing here writes a file.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import psutil

from ..errors import IndexBuildError
from ..utils import format_size
from .checks import min_training_rows
from .choose import estimate_bytes
from .vectors import CHUNK

MIN_CHUNK = 1024
TRAIN_FLOATS = 3  # float32 copies of the sample alive at once: normalised, OPQ-rotated, residuals
CHUNK_FLOATS = 2  # float32 copies of a chunk alive at once: normalised, faiss's transformed copy


def process_rss() -> int:
    """Resident memory of this process now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def training_rows(factory: str, n: int, dim: int) -> tuple[int, int]:
    """(fewest, wanted) training vectors for an index of ``factory`` over n rows; (0, 0) untrained."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return 0, 0
    need, _ = min_training_rows(index)
    ivf = faiss.try_extract_index_ivf(index)
    lists = int(ivf.nlist) if ivf is not None else 0
    wanted = min(n, max(64 * lists, 65_536))
    return min(wanted, max(need, 39 * need)), wanted


@dataclass(frozen=True)
class BuildPlan:
    """What a build may hold at once under its budget."""

    factory: str
    budget: int
    rss: int
    index_bytes: int
    train_rows: int
    chunk_rows: int
    dim: int
    itemsize: int  # bytes of one stored vector component (2 for float16)

    @property
    def train_bytes(self) -> int:
        return self.train_rows * self.dim * (self.itemsize + 4 * TRAIN_FLOATS)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.dim * (self.itemsize + 4 * CHUNK_FLOATS)

    @property
    def total(self) -> int:
        return self.rss + self.index_bytes + self.train_bytes + self.chunk_bytes

    def describe(self) -> str:
        return (f"process {format_size(self.rss)} + index {format_size(self.index_bytes)} + training sample "
                f"{self.train_rows} x {self.dim} ({format_size(self.train_bytes)}) + chunks of {self.chunk_rows} "
                f"({format_size(self.chunk_bytes)}) = {format_size(self.total)} of --memory {format_size(self.budget)}")


def plan_build(factory: str, n: int, dim: int, itemsize: int, memory: int, rss: int | None = None) -> BuildPlan:
    """The largest sample and chunk that fit beside ``factory``'s index; IndexBuildError when even
    the fewest training rows and the smallest chunk do not."""
    rss = process_rss() if rss is None else rss
    least, rows = training_rows(factory, n, dim)
    chunk = min(CHUNK, max(1, n))

    def make(t: int, c: int) -> BuildPlan:
        return BuildPlan(factory, memory, rss, estimate_bytes(factory, n, dim), t, c, dim, itemsize)

    plan = make(rows, chunk)
    while plan.total > memory and (plan.train_rows > least or plan.chunk_rows > min(MIN_CHUNK, chunk)):
        rows = max(least, plan.train_rows // 2)
        chunk = max(min(MIN_CHUNK, chunk), plan.chunk_rows // 2)
        plan = make(rows, chunk)
    if plan.total > memory:
        raise budget_error(plan, n)
    return plan


def budget_error(plan: BuildPlan, n: int) -> IndexBuildError:
    """The error of a budget too small for even the smallest build ``plan``."""
    return IndexBuildError(
        f"--memory {format_size(plan.budget)} is too small to index {n} vectors of dimension {plan.dim}: the smallest "
        f"build ({plan.factory}) needs {plan.describe().rsplit(' of --memory', 1)[0]}. Allow at least "
        f"--memory {format_size(plan.total * 1.1)} (memory=... bytes in Python), or free memory in this process")
