"""Readers (`info`, `search`, `classify`) while a real `embedstore embed` process writes.

Each read must see a consistent prefix of the run: every image once and with its vector, the
counts of one read never below those of the read before, a row found by its own vector. A
classifier comparison over the prefix either runs on what is there or says what is missing.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import embedstore
from embedstore.heads import classify
from embedstore.errors import EmbedstoreError
from embedstore.search import search
from embedstore.store import list_parts
from faultkit import embed_cmd
from imagegen import CLASS_STYLES, draw_image

pytestmark = pytest.mark.slow  # readers polling a real embed process while it runs: python -m pytest -m slow

TOTAL = 3 * 120


def interleaved_list(folder: Path) -> Path:
    """A CSV list whose sorted paths alternate between the classes, so every prefix has them all."""
    folder.mkdir()
    lines = []
    for i in range(TOTAL // len(CLASS_STYLES)):
        for j, style in enumerate(CLASS_STYLES):
            draw_image(style, 10 * i + j).save(folder / f"{i:04d}_{style}.png")
            lines.append(f"{folder.name}/{i:04d}_{style}.png,{style}")
    (folder.parent / "list.csv").write_text("\n".join(lines) + "\n")
    return folder.parent / "list.csv"


def test_info_search_and_classify_see_a_growing_consistent_prefix(tmp_path: Path) -> None:
    src = interleaved_list(tmp_path / "imgs")
    store = tmp_path / "s.h5"
    proc = subprocess.Popen(embed_cmd(src, store, batch_size=1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sizes: list[int] = []
    partial = {"info": 0, "search": 0, "classify": 0}
    try:
        while proc.poll() is None:
            if not (store.exists() or list_parts(store)):
                time.sleep(0.02)
                continue
            st = embedstore.open_store(store)  # what `embedstore info` reads
            if not st.spaces:
                continue
            sp = st.space()
            assert len(sp) == st.n_images == len(set(sp.paths)) == len(set(sp.rows.tolist()))
            assert np.isfinite(sp.vectors.astype(np.float32)).all()
            sizes.append(len(sp))
            partial["info"] += len(sp) < TOTAL

            row = int(sp.rows[-1])
            hit = search(store, rows=[row], k=1, exact=True)["results"][0][0]
            assert hit["row"] == row and hit["score"] > 0.999, hit
            partial["search"] += len(sp) < TOTAL

            try:
                report = classify(str(store), models=["centroid"], protocol="cv")
            except EmbedstoreError as e:  # too few images per class in the prefix so far: said, not crashed
                assert "needs at least 2 classes" in str(e), e
            else:
                assert len(sp) <= report.evaluation["eval"] <= TOTAL
                partial["classify"] += report.evaluation["eval"] < TOTAL
    finally:
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert sizes == sorted(sizes), sizes
    assert all(partial.values()), f"no read during the run for some reader: {partial}"
    assert embedstore.open_store(store).n_images == TOTAL
