"""``embedstore report`` on stores that are not to be trusted and on absurd options: escaped markup,
thumbnails only of files that match their recorded hash, sizes clamped to the store, seeds checked,
output only where asked, and seconds per stage (issue 15)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from imagegen import draw_image
from test_report import Page

from embedstore.report import STAGES, write_report
from embedstore.report.thumbs import data_uri, placeholder_jpeg, thumbnail_from_bytes
from embedstore.store import FAILURE_COLUMNS, write_file
from embedstore._hashing import hash_file
from embedstore_cli.main import main

EVIL = "<script>alert(1)</script>"
STYLES = ("red_disc", "green_square", "blue_stripes")


def crafted_store(tmp: Path, n: int = 30, label: str = EVIL) -> Path:
    """A store written directly (synthetic vectors) over n real image files with their real hashes;
    class labels include ``label`` and one path a folder named like markup."""
    root = tmp / "root"
    paths, labels, hashes = [], [], []
    for i in range(n):
        rel = Path(f"{EVIL[:-9]}" if i == 0 else "imgs") / f"{i:03d}.png"  # "<script>alert(1)</" + ".../000.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        draw_image(STYLES[i % 3], seed=i).save(root / rel)
        paths.append(str(rel))
        labels.append(label if i % 3 == 0 else STYLES[i % 3])
        hashes.append(hash_file(str(root / rel)))
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16))
    vectors = (centres[np.arange(n) % 3] + 0.1 * rng.standard_normal((n, 16))).astype(np.float16)
    images = {"path": paths, "label": labels, "split": [""] * n, "size": [1] * n, "hash": hashes, "mtime": [0.0] * n}
    attrs = {"backbone": "synthetic", "weights_sha256": "f" * 64, "dim": 16, "dtype": "float16"}
    failures = {"path": [f"bad/{EVIL}.png"], "space": ["syn"], "error": ["DecodeError"],
                "message": [f"cannot decode {EVIL}"], "size": [1], "mtime": [0.0]}
    assert set(failures) == set(FAILURE_COLUMNS)
    store = tmp / "crafted.h5"
    write_file(store, {"root": str(root), "created": "now"}, images, {"syn": (attrs, np.arange(n), vectors)}, failures)
    return store


def test_store_values_are_escaped_and_css_js_are_package_files(tmp_path: Path) -> None:
    store = crafted_store(tmp_path)
    s = write_report(store, tmp_path / "r.html", queries=3, k=2, models=["knn"])
    text = (tmp_path / "r.html").read_text()
    assert "alert(1)" in text and s["classifiers"] is not None  # the labels made it into the page ...
    assert "<script>alert" not in text and "</script>.png" not in text  # ... never as markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # legend, tables, captions: escaped
    page = Page(text)
    assert len(page.find("script")) == 2  # only the page's own: the thumbnails JSON and the JS
    assert any(v[2] == EVIL for v in page.thumbs.values())  # the JSON keeps the label intact
    folder = resources.files("embedstore.report") / "templates"
    css, js = (folder / "report.css").read_text(), (folder / "report.js").read_text()
    assert f"<style>{css}</style>" in text and f"<script>{js}</script>" in text  # inlined verbatim


def test_thumbnail_only_of_a_file_matching_the_recorded_hash(tmp_path: Path) -> None:
    """A store whose path column was edited to name another file (outside its root) must not show it."""
    store = crafted_store(tmp_path, label="red_disc")
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    draw_image("green_square", seed=999).save(secret)
    with h5py.File(store, "r+") as f:
        f["images/path"][5] = str(secret)  # absolute, outside the root, a different hash
        f["images/path"][6] = "../elsewhere/secret.png"  # relative, escaping the root
    s = write_report(store, tmp_path / "r.html", max_points=30, queries=0, models=[], thumb_px=72)
    page = Page((tmp_path / "r.html").read_text())
    forbidden = data_uri(thumbnail_from_bytes(secret.read_bytes(), 72))
    placeholder = data_uri(placeholder_jpeg(72))
    assert forbidden not in (tmp_path / "r.html").read_text()
    assert page.thumbs["5"][0] == page.thumbs["6"][0] == placeholder
    assert page.thumbs["7"][0] != placeholder  # untouched rows still show their image
    assert s["changed_images"] == 2 and s["missing_images"] == 0 and s["thumbnails"] == 30
    assert any("no longer match the content hash" in n for n in s["notes"])


def test_stages_are_timed_and_reported(tmp_path: Path) -> None:
    store = crafted_store(tmp_path, label="red_disc")
    lines: list[str] = []
    s = write_report(store, tmp_path / "r.html", queries=2, models=["knn"], progress=lines.append)
    assert set(s["stages"]) == set(STAGES) | {"total"} and all(v >= 0 for v in s["stages"].values())
    assert sum(v for k, v in s["stages"].items() if k != "total") <= s["stages"]["total"] + 0.01
    assert len(lines) == len(STAGES) + 1 and all(line.startswith("report: ") for line in lines)
    runner = CliRunner()
    res = runner.invoke(main, ["report", str(store), "--out", str(tmp_path / "j.html"), "--json", "--models", "none"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["stages"]) == set(STAGES) | {"total"} and "report: " not in res.stderr
    res = runner.invoke(main, ["report", str(store), "--out", str(tmp_path / "p.html"), "--models", "none"])
    assert res.exit_code == 0 and res.stderr.count("report: ") == len(STAGES) + 1 and "2-D map of syn" in res.stderr
    res = runner.invoke(main, ["report", str(store), "--out", str(tmp_path / "q.html"), "--models", "none", "--quiet"])
    assert res.exit_code == 0 and "report: " not in res.stderr


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32)])
def test_seed_out_of_range_is_a_usage_error(tmp_path: Path, seed: str) -> None:
    res = CliRunner().invoke(main, ["report", str(tmp_path / "any.h5"), "--seed", seed])
    assert res.exit_code == 2 and "Invalid value for '--seed'" in res.output and "Traceback" not in res.output
    with pytest.raises(ValueError, match="seed"):
        write_report(tmp_path / "any.h5", tmp_path / "r.html", seed=int(seed))


def test_absurd_sizes_are_clamped_and_output_lands_beside_the_store(tmp_path: Path) -> None:
    """-k / --queries / --max-points of a billion on a 30-image store finish quickly; run from another
    folder without --out, the page is written next to the store (nothing else anywhere) and its
    absolute path printed."""
    store = crafted_store(tmp_path, label="red_disc")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    before = set(os.listdir(tmp_path))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "embedstore_cli.main", "report", os.path.relpath(store, cwd),
                          "-k", "1000000000", "--queries", "1000000000", "--max-points", "1000000000",
                          "--models", "none"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert time.monotonic() - t0 < 100
    page = tmp_path / "crafted.report.html"
    assert f"wrote {page} (" in res.stdout  # the absolute path
    assert os.listdir(cwd) == [] and set(os.listdir(tmp_path)) - before == {page.name}
    assert "k lowered from 1000000000 to 29" in res.stderr and "queries lowered from 1000000000 to 30" in res.stderr
    text = page.read_text()
    assert "30 neighbour queries with 29 neighbours each" in text


def test_typed_api_models_is_a_list_and_threshold_follows_duplicates(tmp_path: Path) -> None:
    """write_report takes head names as a list (the CLI parses the comma list); its near-duplicate
    threshold defaults to the one ``duplicates`` uses, in the library and on the command line."""
    import inspect

    from embedstore.errors import ReportError
    from embedstore.search import DUPLICATES_THRESHOLD

    with pytest.raises(ReportError, match=r"\['logreg', 'knn'\]"):
        write_report(tmp_path / "any.h5", tmp_path / "r.html", models="logreg,knn")
    assert not (tmp_path / "r.html").exists()
    assert inspect.signature(write_report).parameters["threshold"].default == DUPLICATES_THRESHOLD
    option = next(p for p in main.commands["report"].params if p.name == "threshold")
    assert option.default == DUPLICATES_THRESHOLD and option.show_default
    res = CliRunner().invoke(main, ["report", str(tmp_path / "any.h5"), "--models", "logreg,xgboost"])
    assert res.exit_code == 1 and res.output.startswith("Error: unknown model(s) xgboost"), res.output
