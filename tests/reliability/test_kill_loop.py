"""SIGKILL `embedstore embed` at 20 random moments: the resumed store equals an uninterrupted one.

After every kill the store holds a consistent prefix of the uninterrupted run; once a run
completes, the next starts over, so the kills land all through the work."""
from __future__ import annotations

from pathlib import Path

import pytest

from imagegen import make_collection  # tests/conftest.py
from faultkit import compare_stores, consistent_prefix, embed_cmd, kill_loop, start_over_after_completion, timed_run
from embedstore.store import journal_dir, list_parts

pytestmark = pytest.mark.slow  # twenty SIGKILLs of real embed processes: python -m pytest -m slow

KILLS = 20


def test_twenty_random_kills_lose_and_duplicate_nothing(tmp_path: Path):
    src = make_collection(tmp_path / "imgs", per_class=30, splits=("train", "val"))
    (src / "train" / "red_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    reference = tmp_path / "reference.h5"
    full_run = timed_run(embed_cmd(src, reference))

    store = tmp_path / "killed.h5"
    report = kill_loop(embed_cmd(src, store), store, kills=KILLS, max_delay=full_run, seed=1,
                       after_kill=consistent_prefix(store, reference),
                       before_run=start_over_after_completion(store))
    assert report.kills == KILLS

    diff = compare_stores(store, reference)
    assert diff["rows"] == 180
    assert (diff["rows_lost"], diff["rows_duplicated"], diff["rows_extra"], diff["duplicate_images"]) == (0, 0, 0, 0)
    assert diff["vectors_differ"] == 0
    assert diff["failures"] == diff["reference_failures"] == 1
    assert not list_parts(store) and not journal_dir(store).exists()
    assert not list(tmp_path.glob(".killed.h5.tmp-*"))  # no half-written file left behind
