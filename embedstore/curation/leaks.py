"""Leaks between splits: near-duplicate pairs whose two images are in different splits (train/val/test).

Crash safety: pure computation over the k-NN graph's batches; nothing here writes a file (the graph
itself is built and cached by :func:`embedstore.search.knn_graph`, the one ``duplicates`` uses).

FiftyOne calls this the "leaky splits" check: an image of the val or test split with a near-copy in
train (re-encoded, resized, cropped) scores the model on what it has seen. A pair is an edge of the
space's k-NN graph at cosine >= ``threshold`` (the same cut as :func:`embedstore.search.duplicates`)
whose images have two different, non-empty splits; images without a split are never paired.
Memory: the split code of each image and the pairs found.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..store import Space
from .records import image_records

SPLIT_ORDER = ("train", "val", "test")  # a pair lists its image of the earlier split first


class LeakPairs:
    """Cross-split pairs of a space at cosine >= threshold, filled batch by batch from the k-NN graph."""

    def __init__(self, sp: Space, threshold: float) -> None:
        self.sp, self.threshold = sp, float(threshold)
        codes, self.split_names = sp.codes("split")
        self.codes = np.asarray(codes)
        rank = {name: i for i, name in enumerate(SPLIT_ORDER)}
        order = sorted(range(len(self.split_names)), key=lambda c: (rank.get(self.split_names[c], len(rank)),
                                                                     self.split_names[c]))
        self.rank = np.empty(len(self.split_names) + 1, np.int64)  # by code; the last slot for code -1
        self.rank[order] = np.arange(len(order))
        self.rank[-1] = len(order)
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._s: list[np.ndarray] = []

    @property
    def splits(self) -> list[str]:
        """The split names the space's images have (none: nothing can leak)."""
        present = np.unique(self.codes[self.codes >= 0])
        return [self.split_names[c] for c in present[np.argsort(self.rank[present], kind="stable")]]

    def add(self, positions: slice, found: np.ndarray, scores: np.ndarray) -> None:
        """One batch of the graph: ``found`` store rows (-1 none) and their cosines, best first."""
        own = self.sp.rows[positions][:, None]
        keep = (scores >= self.threshold) & (found >= 0) & (found != own)
        src = np.broadcast_to(np.arange(positions.start, positions.stop)[:, None], keep.shape)[keep]
        dst = self.sp.positions_of(found[keep])
        sims = scores[keep]
        ok = dst >= 0  # a stale index may name rows the space no longer has
        src, dst, sims = src[ok], dst[ok], sims[ok]
        cs, cd = self.codes[src], self.codes[dst]
        cross = (cs >= 0) & (cd >= 0) & (cs != cd)
        src, dst, sims = src[cross], dst[cross], sims[cross]
        first = self.rank[self.codes[src]] <= self.rank[self.codes[dst]]  # earlier split first: train, val, test
        self._a.append(np.where(first, src, dst))
        self._b.append(np.where(first, dst, src))
        self._s.append(sims.astype(np.float32))

    def pairs(self, top: int | None) -> tuple[list[dict[str, Any]], int]:
        """(the pairs, highest cosine first, ``top`` of them (None: all); how many there are). Each pair
        once, with its higher cosine when both images found each other."""
        if not self._a:
            return [], 0
        a, b, s = np.concatenate(self._a), np.concatenate(self._b), np.concatenate(self._s)
        order = np.lexsort((b, a, -s))  # best score first, so the first of each (a, b) is its highest
        a, b, s = a[order], b[order], s[order]
        _, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)
        first = np.sort(first)  # back in score order
        total = len(first)
        first = first if top is None else first[:top]
        a, b, s = a[first], b[first], s[first]
        images = image_records(self.sp, np.concatenate([a, b]))
        m = len(a)
        return [{"score": round(float(s[i]), 6), "a": images[i], "b": images[m + i]} for i in range(m)], total
