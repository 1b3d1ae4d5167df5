"""``embedstore report``: a self-contained HTML page, checked structurally and in headless Chromium.

The browser test keeps the page and its screenshot (``report.html``, ``report.png``) in the
``artifacts`` folder (tests/conftest.py: $EMBEDSTORE_ARTIFACTS, else test-artifacts/).
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from imagegen import TINY_BACKBONE, make_collection
from PIL import Image

import embedstore
from embedstore.finetuning import finetune
from embedstore.report import data_uri, placeholder_jpeg, project, write_report
from embedstore.store import FAILURE_COLUMNS, open_store, write_file
from embedstore_cli.main import main

THUMB = 72
URL = re.compile(r"https?://", re.I)


def _map_method() -> str:
    try:
        from umap import UMAP  # noqa: F401
    except ImportError:
        return "tsne"
    return "umap"


MAP_METHOD = _map_method()


class Page(HTMLParser):
    """Every start tag with its attributes, the text of elements by id, and the thumbnails JSON."""

    VOID = {"img", "br", "input", "meta", "link", "hr", "source"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.ids: dict[str, str] = {}
        self._stack: list[tuple[str, str | None]] = []
        self.feed(text)
        self.thumbs = json.loads(self.ids["thumbs"])

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if "id" in a:
            self.ids[a["id"]] = ""
        if tag not in self.VOID:
            self._stack.append((tag, a.get("id")))

    def handle_endtag(self, tag: str) -> None:
        while self._stack and self._stack.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for _, i in self._stack:
            if i is not None:
                self.ids[i] += data

    def find(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag]


def circles_of(text: str, svg_id: str) -> list[int]:
    svg = re.search(rf'<svg class="map" id="{svg_id}".*?</svg>', text, flags=re.S)
    assert svg, f"no map {svg_id}"
    return [int(r) for r in re.findall(r'<circle class="pt"[^>]*data-row="(\d+)"', svg.group(0))]


def decode_jpeg(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,"), uri[:40]
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
    im.load()
    assert im.format == "JPEG"
    return im


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """30 generated images (3 classes, train/val) plus one unreadable file, a frozen and a fine-tuned
    space, then one image file deleted: the report must show a placeholder for it."""
    tmp = tmp_path_factory.mktemp("report")
    images = make_collection(tmp / "images", per_class=5)
    (images / "train" / "red_disc" / "broken.png").write_bytes(b"not an image")
    store = tmp / "shapes.h5"
    embedstore.embed(images, store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    finetune(store, epochs=1, unfreeze=1, batch_size=16, workers=0, progress=False)
    gone = images / "val" / "green_square" / "green_square_002.png"
    gone.unlink()
    out = tmp / "shapes.html"
    summary = write_report(store, out, queries=4, k=3, models=["logreg", "knn"], thumb_px=THUMB)
    return {"store": store, "out": out, "summary": summary, "text": out.read_text(), "gone": gone, "tmp": tmp}


def test_labelled_report_is_self_contained_and_complete(labelled: dict[str, Any]) -> None:
    s, text, st = labelled["summary"], labelled["text"], open_store(labelled["store"])
    page = Page(text)
    frozen, tuned = "test_efficientnet-random", "test_efficientnet-random-ft"
    assert s["sections"] == ["summary", "failures", "space-0", "space-1", "classifiers", "audit", "finetune"]
    assert s["spaces"] == [frozen, tuned] and s["bytes"] == len(text.encode())
    assert set(s["seconds"]) >= {"projection", "thumbnails", "neighbours", "duplicates", "classifiers", "total"}

    # self-contained: nothing to fetch, no URL at all, every src/href inline or an anchor
    assert not URL.search(text)
    links = [a.get("src") or a.get("href") for _, a in page.tags if a.get("src") or a.get("href")]
    assert links and all(v.startswith(("data:image/jpeg;base64,", "#")) for v in links)
    assert not page.find("link") and all("src" not in a for a in page.find("script"))

    # one map point per sampled row, every row of each space (30 <= max_points), by the recorded method
    for i, name in enumerate((frozen, tuned)):
        rows = circles_of(text, f"map-{i}")
        assert len(rows) == s["sampled"][name]["map_points"] == 30 == s["sampled"][name]["of"]
        assert sorted(rows) == sorted(st.spaces[name].rows.tolist())
        assert s["projection"][name] == MAP_METHOD
    assert ("t-SNE (scikit-learn" if MAP_METHOD == "tsne" else "UMAP (umap-learn") in page.ids["space-1"]
    assert "all 30 images" in page.ids["space-0"] and "4 query images" in page.ids["space-0"]

    # failures, classifiers (2 spaces x 2 heads), the best head's 3x3 confusion matrix over the 15 val images
    assert "broken.png" in page.ids["failures-table"]
    table = re.search(r'<table id="classifier-table">.*?</table>', text, flags=re.S).group(0)
    assert table.count("<tr") == 1 + 4 and table.count('class="best"') == 1
    cells = [int(c) for c in re.findall(r"<td[^>]*>(\d+)</td>", re.search(
        r'<table id="confusion-matrix".*?</table>', text, flags=re.S).group(0))]
    assert len(cells) == 9 and sum(cells) == 15
    assert s["classifiers"]["accuracy"] >= 0.8  # 3 separable classes even for a random network
    assert frozen in page.ids["finetune"] and tuned in page.ids["finetune"] and "LP-FT" in page.ids["finetune"]
    assert "logreg accuracy" in page.ids["finetune"] and "knn accuracy" in page.ids["finetune"]
    assert "30 of 30" in page.ids["sampling"]

    # thumbnails: valid small JPEGs; the deleted file is the placeholder, marked as missing
    uris = [a["src"] for a in page.find("img") if "src" in a] + [v[0] for v in page.thumbs.values()]
    assert len(uris) > 30
    for uri in set(uris):
        assert max(decode_jpeg(uri).size) <= THUMB
    gone = str(labelled["gone"].relative_to(st.root))
    row = list(st.images["path"]).index(gone)
    assert page.thumbs[str(row)][0] == data_uri(placeholder_jpeg(THUMB)) and page.thumbs[str(row)][1] == gone
    assert s["missing_images"] == 1 and s["thumbnails"] == len(page.thumbs) == 30


def test_sampled_unlabelled_store_without_image_files(tmp_path: Path) -> None:
    """300 vectors (3 exact duplicate pairs), no labels, no image files: sampled map, placeholders,
    duplicate groups found, no classifier comparison."""
    n = 300
    vectors = np.random.default_rng(0).standard_normal((n, 32)).astype(np.float32)
    vectors[[1, 3, 5]] = vectors[[0, 2, 4]]
    images = {"path": [f"img/{i:04d}.jpg" for i in range(n)], "label": [""] * n, "split": [""] * n,
              "size": [1] * n, "hash": [f"{i:032x}" for i in range(n)], "mtime": [0.0] * n}
    attrs = {"backbone": "synthetic", "weights_sha256": "f" * 64, "dim": 32, "dtype": "float16"}
    store = tmp_path / "vectors.h5"
    write_file(store, {"root": str(tmp_path), "created": "now"}, images,
               {"syn": (attrs, np.arange(n), vectors.astype(np.float16))}, {c: [] for c in FAILURE_COLUMNS})
    s = write_report(store, tmp_path / "r.html", max_points=50, queries=3, seed=1)
    text = (tmp_path / "r.html").read_text()
    assert s["sections"] == ["summary", "failures", "space-0", "classifiers"]
    assert s["sampled"]["syn"] == {"map_points": 50, "of": 300, "queries": 3}
    assert len(circles_of(text, "map-0")) == 50 and len(set(circles_of(text, "map-0"))) == 50
    assert "a seeded random sample of 50 of its 300 images" in text and "syn: 50 of 300" in text
    assert s["duplicate_groups"] == {"syn": 3} and s["classifiers"] is None
    assert "Not run: the store has fewer than 2 labelled classes" in text
    assert s["missing_images"] == s["thumbnails"] >= 50  # every file is absent: all placeholders
    assert not URL.search(text)
    again = write_report(store, tmp_path / "r2.html", max_points=50, queries=3, seed=1)
    assert circles_of((tmp_path / "r2.html").read_text(), "map-0") == circles_of(text, "map-0")  # seeded
    assert again["sampled"] == s["sampled"]


def test_projection_method_follows_size() -> None:
    rng = np.random.default_rng(0)
    xy, method, how = project(rng.standard_normal((10, 16)))
    assert xy.shape == (10, 2) and method == "pca" and "PCA" in how
    assert project(rng.standard_normal((2, 16)))[1] == "none"
    xy, method, _ = project(rng.standard_normal((40, 16)))
    assert xy.shape == (40, 2) and method == MAP_METHOD and np.isfinite(xy).all()


def test_report_command(labelled: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.html"
    res = runner.invoke(main, ["report", str(labelled["store"]), "--out", str(out), "--space",
                               "test_efficientnet-random", "--max-points", "10", "--queries", "2", "--models",
                               "none", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["path"] == str(out) and out.stat().st_size == s["bytes"]
    assert s["spaces"] == ["test_efficientnet-random"] and s["classifiers"] is None
    assert s["sampled"]["test_efficientnet-random"]["map_points"] == 10 and "finetune" not in s["sections"]
    res = runner.invoke(main, ["report", str(tmp_path / "absent.h5")])
    assert res.exit_code == 1 and "no store at" in res.output and "Traceback" not in res.output
    (tmp_path / "corrupt.h5").write_bytes(b"\x89HDF\r\n garbage")
    res = runner.invoke(main, ["report", str(tmp_path / "corrupt.h5")])
    assert res.exit_code == 1 and "not a readable embedstore file" in res.output
    res = runner.invoke(main, ["report", str(labelled["store"]), "--models", "nope", "--out", str(out)])
    assert res.exit_code == 1 and "unknown model" in res.output


def test_report_help_imports_no_heavy_library() -> None:
    probe = ("import json, sys\nfrom embedstore_cli.main import main\ntry:\n    main(['report', '--help'])\n"
             "except SystemExit as e:\n    code = e.code\nheavy = [m for m in ('torch', 'timm', 'faiss', 'sklearn', "
             "'h5py') if m in sys.modules]\nprint(json.dumps({'exit': code, 'heavy': heavy}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"exit": 0, "heavy": []}
    assert "self-contained HTML" in out.stdout


# --------------------------------------------------------------------------- headless browser


def chromium() -> str:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium binary on PATH (apt-get install chromium): the browser test needs one")


def run_chromium(binary: str, page: Path, profile: Path, *extra: str,
                 fragment: str = "") -> subprocess.CompletedProcess:
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra,
            page.resolve().as_uri() + fragment]
    return subprocess.run(args, capture_output=True, text=True, timeout=180)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]


def body_data(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


def test_report_in_headless_chromium(labelled: dict[str, Any], tmp_path: Path, artifacts: Path) -> None:
    binary = chromium()
    # the harness itself sees console errors and broken images (else a clean result would prove nothing)
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="data:image/jpeg;base64,AAAA"><script>console.error("boom");'
                   "window.addEventListener('load', function () { document.body.dataset.broken = "
                   "document.images[0].naturalWidth === 0 ? '1' : '0'; }); missing();</script></body></html>")
    res = run_chromium(binary, bad, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom")
    lines = console_lines(res.stderr)
    if not lines:
        pytest.skip(f"{binary} does not log console messages to stderr; cannot check the page for errors")
    assert any("boom" in x for x in lines) and any("Uncaught" in x for x in lines)
    assert body_data(res.stdout) == {"broken": "1"}

    s, page = labelled["summary"], labelled["out"]
    # #selfcheck: the page also loads every hover thumbnail before its load event, then counts them
    res = run_chromium(binary, page, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom",
                       fragment="#selfcheck")
    assert res.returncode == 0, res.stderr[-2000:]
    assert console_lines(res.stderr) == []
    data = body_data(res.stdout)
    n_imgs = len([a for a in Page(labelled["text"]).find("img") if a.get("src")])
    assert data["ready"] == "1" and data["hover"] == "ok"
    assert data["images-broken"] == "0" and int(data["images-ok"]) == n_imgs > 0
    assert data["thumbs-broken"] == "0" and int(data["thumbs-ok"]) == s["thumbnails"]
    assert int(data["map-points"]) == sum(v["map_points"] for v in s["sampled"].values())
    for element in ('<svg class="map" id="map-0"', '<svg class="map" id="map-1"', '<table id="classifier-table"',
                    '<table id="confusion-matrix"', 'id="finetune"'):
        assert element in res.stdout

    shot = tmp_path / "report.png"
    res = run_chromium(binary, page, tmp_path / "profile", "--window-size=1280,2000", "--hide-scrollbars",
                       "--virtual-time-budget=5000", f"--screenshot={shot}")
    assert shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        assert np.asarray(im.convert("L")).std() > 10  # something was drawn
    shutil.copy(shot, artifacts / "report.png")
    shutil.copy(page, artifacts / "report.html")
