"""End to end on the real hymenoptera photos (skipped where ../shared is absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import embedstore

pytestmark = pytest.mark.slow  # 398 photos through the default backbone


def test_hymenoptera_embeds_with_the_default_backbone(tmp_path: Path, hymenoptera: Path):
    from sklearn.linear_model import LogisticRegression

    store = tmp_path / "hym.h5"
    summary = embedstore.embed(hymenoptera, store, progress=False)
    assert summary["images"] == 398 and summary["embedded"] + summary["failed"] == 398
    st = embedstore.open_store(store)
    sp = st.space("efficientnet_lite0")
    assert sp.dim == 1280 and len(sp) == summary["embedded"] >= 397
    assert {"ants", "bees"} == set(sp.labels) and {"train", "val"} == set(sp.splits)
    X = sp.vectors.astype(np.float32)
    train = sp.splits == "train"
    clf = LogisticRegression(max_iter=3000, C=0.5).fit(X[train], sp.labels[train])
    assert clf.score(X[~train], sp.labels[~train]) >= 0.9  # frozen ImageNet features separate ants/bees
    assert embedstore.embed(hymenoptera, store, progress=False)["embedded"] == 0
