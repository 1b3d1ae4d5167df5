"""One rule for the best head (classify and report agree), clamps, seeds and where classify writes."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedstore.heads import MODELS, best_result, classify
from embedstore_cli.main import main

TIED = ["centroid", "knn", "logreg"]  # on the tiny store all three score 1.0 on every measure


def test_best_result_breaks_ties_by_the_documented_order_never_by_timings(tiny_store: Path) -> None:
    rows = classify(str(tiny_store), models=TIED).results
    assert len({(r["accuracy"], r["balanced_accuracy"], r["macro_f1"]) for r in rows}) == 1  # a real tie
    rng = random.Random(0)
    for _ in range(20):  # any row order, any timings: the same head
        shuffled = [dict(r, fit_s=rng.random(), predict_s=rng.random()) for r in rng.sample(rows, len(rows))]
        assert best_result(shuffled)["model"] == "logreg"  # the first of MODELS among the tied
    # the measures come first: a better balanced accuracy or macro-F1 wins over the catalogue order
    better = [dict(r) for r in rows]
    knn = next(r for r in better if r["model"] == "knn")
    for r in better:
        r["balanced_accuracy"] = 0.9 if r is not knn else 0.95
    assert best_result(better)["model"] == "knn"
    assert list(MODELS).index("logreg") < list(MODELS).index("knn")
    with pytest.raises(ValueError):
        best_result([])


def test_classify_and_report_name_the_same_best_head_on_a_tie(tiny_store: Path, tmp_path: Path) -> None:
    """F12: the CLI's best, the library's best and the report's best are one rule's choice."""
    from embedstore.report import write_report

    res = CliRunner().invoke(main, ["classify", str(tiny_store), "--models", ",".join(TIED), "--json", "--no-confusion"])
    assert res.exit_code == 0, res.output
    cli_best = json.loads(res.output)["best"]
    library = classify(str(tiny_store), models=["logreg", "knn", "centroid"])  # another order, another run
    summary = write_report(tiny_store, tmp_path / "r.html", models=TIED, queries=2, max_points=50)
    assert (cli_best["space"], cli_best["model"]) == (library.best["space"], library.best["model"])
    assert summary["classifiers"]["model"] == cli_best["model"] == best_result(library.results)["model"] == "logreg"


def test_negative_seed_is_a_usage_error_naming_the_option(tiny_store: Path) -> None:
    res = CliRunner().invoke(main, ["classify", str(tiny_store), "--seed", "-1"])
    assert res.exit_code == 2 and "--seed" in res.output and "Traceback" not in res.output


def test_confusion_picture_goes_beside_the_store_not_into_the_working_folder(
        tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F9: with the store given relative to another folder, the default picture lands beside the
    store (STORE.<space>.<model>.confusion.png), nothing is written where the command runs, and the
    path is printed."""
    elsewhere = tmp_path / "work" / "here"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    relative = os.path.relpath(tiny_store, elsewhere)
    assert relative.startswith("..")
    before = set(tiny_store.parent.iterdir())
    res = CliRunner().invoke(main, ["classify", relative, "--models", "knn"])
    assert res.exit_code == 0, res.output
    assert list(elsewhere.iterdir()) == []
    made = set(tiny_store.parent.iterdir()) - before
    assert len(made) == 1
    png = made.pop()
    assert png.name.startswith("tiny.") and png.name.endswith(".knn.confusion.png")
    assert f"confusion matrix: {os.path.join(os.path.dirname(relative), png.name)}" in res.output
