"""SIGKILL `embedstore index` and `embedstore finetune` at random moments (20 kills each).

After every kill the store opens, a search answers from a whole index (the previous generation
or the new one, never a mix) and the fine-tune checkpoint is complete; the last run completes,
and the final index / fine-tuned space equals one built without interruption. The scenarios
live in scenarios.py; benchmarks/faults.py runs them at length.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from scenarios import finetune_kills, index_kills

pytestmark = pytest.mark.slow  # SIGKILL loops of real index and finetune processes: python -m pytest -m slow


def test_killed_index_builds_leave_a_whole_index_and_converge(tmp_path: Path) -> None:
    r = index_kills(tmp_path, first=50_000, total=60_000, kills=10, seed=4)
    assert r["faults_injected"] == 20
    assert (r["rows"], r["rows_lost"], r["rows_duplicated"], r["vectors_differ"]) == (60_000, 0, 0, 0)
    assert r["same_factory"] and r["stray_files"] == []
    assert r["served_after_kills"] and set(r["served_after_kills"]) <= {50_000, 60_000}


def test_killed_finetune_resumes_into_the_uninterrupted_result(tmp_path: Path) -> None:
    r = finetune_kills(tmp_path, per_class=8, kills=20, seed=6)
    assert r["faults_injected"] == 20 and r["finished"]
    assert r["same_weights"]  # bit for bit the uninterrupted run's weights
    assert (r["rows"], r["rows_lost"], r["rows_duplicated"], r["vectors_differ"]) == (r["parent_rows"], 0, 0, 0)
