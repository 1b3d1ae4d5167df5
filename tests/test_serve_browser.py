"""The page of ``embedstore serve``, end to end: the real server (a subprocess of the CLI, with a
token) and the page in headless Chromium, driven by Playwright.

Covers an image upload through the file input (its own row comes first, score 1.000), searching
from a clicked hit (exclude_self), the label filter, paging, a non-image upload (the error box,
then an image dropped on the page), the Random button, the token on API calls and image links (and
the message without it), the text box and its request (for a space /api/info says has a text
tower), and that the page loads nothing from anywhere but the server and throws no error. The
screenshot of a search is kept as ``serve.png`` (and the small palette PNG as ``serve-small.png``)
in the ``artifacts`` folder; ``EMBEDSTORE_UPDATE_DOCS=1`` also writes ``docs/serve.png`` (the README's).
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from embedstore import open_store

DOCS = Path(__file__).resolve().parents[1] / "docs"
TOKEN = "s3cret-token"
K = 24  # the page's default page size
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--disable-default-apps"]


@pytest.fixture
def chromium() -> str:
    """The system's Chromium for Playwright (no browser of Playwright's own is downloaded); checked
    before the server starts, so a machine without either skips at once."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the browser is the system's: "
                    "apt-get install chromium)")
    for name in ("chromium", "chromium-headless-shell", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium binary on PATH (apt-get install chromium): the browser test needs one")


def api(url: str, path: str, body: dict | None = None) -> Any:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {TOKEN}"},
                                 data=None if body is None else json.dumps(body).encode())
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as res:
        return json.load(res)


@pytest.fixture
def server(tiny_store: Path, tmp_path: Path) -> Iterator[str]:
    """``embedstore serve tiny_store --token TOKEN`` on a free port; its base URL once /api/info answers."""
    import embedstore

    embedstore.build_index(tiny_store, kind="flat")  # the page shows the index in use
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "embedstore_cli.main", "serve", str(tiny_store), "--port", "0",
                                 "--json", "--token", TOKEN, "--device", "cpu"],
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"})
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert lines and lines[0].strip(), f"no address from embedstore serve --json: {log.read_text()[-3000:]}"
        url = json.loads(lines[0])["url"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}): {log.read_text()[-3000:]}"
            try:
                api(url, "/api/info")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"/api/info did not answer in 30 s: {log.read_text()[-3000:]}"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def keep_screenshot(page: Any, artifact: Path, doc: Path, photo_colors: int = 32) -> None:
    """The page's screenshot as taken in ``artifact``; in ``doc`` (the README shows it) as a palette
    PNG under 200 KB. The generated images' pixel noise would be most of its bytes, so the images
    get a few colours of their own and the page around them the rest of the palette."""
    png = page.screenshot()
    artifact.write_bytes(png)
    boxes = page.evaluate("""() => [...document.images].filter(i => i.offsetParent !== null).map(i => {
        const r = i.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })""")
    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
    assert rgb.size == (1280, 900)
    a = np.asarray(rgb)
    photo = np.zeros(a.shape[:2], bool)
    for left, top, right, bottom in boxes:
        photo[max(0, int(top)):max(0, math.ceil(bottom)), max(0, int(left)):max(0, math.ceil(right))] = True
    assert photo.any() and not photo.all()

    def palette(pixels: np.ndarray, n: int, method: Image.Quantize) -> Image.Image:
        return Image.fromarray(pixels.reshape(1, -1, 3)).quantize(n, method=method, dither=Image.Dither.NONE)

    n_page = 256 - photo_colors
    photos = palette(a[photo], photo_colors, Image.Quantize.FASTOCTREE)
    rest = palette(a[~photo], n_page, Image.Quantize.MEDIANCUT)
    in_photos = np.asarray(rgb.quantize(palette=photos, dither=Image.Dither.NONE)).astype(np.int32) + n_page
    index = np.where(photo, in_photos, np.asarray(rgb.quantize(palette=rest, dither=Image.Dither.NONE)))
    small = Image.fromarray(index.astype(np.uint8), "P")
    small.putpalette(rest.getpalette()[:3 * n_page] + photos.getpalette()[:3 * photo_colors])
    out = io.BytesIO()
    small.save(out, "PNG", optimize=True)
    assert out.tell() < 200_000, out.tell()
    artifact.with_name(f"{artifact.stem}-small.png").write_bytes(out.getvalue())
    if os.environ.get("EMBEDSTORE_UPDATE_DOCS") == "1":  # a test run leaves the checkout as it was
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_bytes(out.getvalue())


def test_search_page_in_chromium(chromium: str, server: str, tiny_store: Path, collection: Path, tmp_path: Path,
                                 artifacts: Path) -> None:
    from playwright.sync_api import sync_playwright

    rel = "val/green_square/green_square_001.png"
    other = "train/blue_stripes/blue_stripes_002.png"
    with open_store(tiny_store) as st:
        row, other_row = (int(r) for r in st.rows_of([rel, other]))
        space = next(iter(st.spaces))
    assert row >= 0 and other_row >= 0
    not_image = tmp_path / "notes.txt"
    not_image.write_text("this is not an image\n")

    requests: list[str] = []
    page_errors: list[str] = []
    console_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        try:

            def watch(page: Any) -> None:
                page.set_default_timeout(10_000)
                page.on("request", lambda r: requests.append(r.url))
                page.on("pageerror", lambda e: page_errors.append(str(e)))
                page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

            page = browser.new_page(viewport={"width": 1280, "height": 900})
            watch(page)
            searches = 0

            def wait_search() -> list[dict[str, Any]]:
                """Wait for the next answered search; the grid's hits as {row, label, score, path}."""
                nonlocal searches
                searches += 1
                page.wait_for_selector(f'#results[data-searches="{searches}"][data-state="done"]')
                return page.eval_on_selector_all("#results .hit", """els => els.map(e => ({
                    row: +e.dataset.row, label: e.dataset.label, split: e.dataset.split,
                    score: e.querySelector('.score').textContent,
                    path: e.querySelector('.path').textContent}))""")

            def wait_images() -> None:
                """Every image in view has loaded (thumbnails need the token: ?token=...)."""
                page.wait_for_function("""() => [...document.images].filter(i => !i.hidden
                    && i.getBoundingClientRect().top < innerHeight).every(i => i.complete && i.naturalWidth > 0)""")

            page.goto(f"{server}/?token={TOKEN}")
            page.wait_for_function("document.getElementById('store').textContent.includes('36 images')")
            assert page.input_value("#space") == space
            assert page.is_hidden("#text-box")  # the tiny network has no text tower
            assert page.is_hidden("#error")
            assert page.eval_on_selector_all("#label option", "os => os.map(o => o.value)") == \
                ["", "blue_stripes", "green_square", "red_disc"]
            assert page.eval_on_selector_all("#split option", "os => os.map(o => o.value)") == ["", "train", "val"]

            # 1. an uploaded image finds itself first
            page.set_input_files("#file", str(collection / rel))
            hits = wait_search()
            assert len(hits) == K
            assert hits[0] == {"row": row, "label": "green_square", "split": rel.split("/")[0], "score": "1.000", "path": rel}
            assert all(re.fullmatch(r"-?\d\.\d{3}", h["score"]) for h in hits)
            assert [float(h["score"]) for h in hits] == sorted((float(h["score"]) for h in hits), reverse=True)
            assert page.get_attribute("#drop", "data-query") == "image"
            assert page.get_attribute("#query-img", "src").startswith("blob:")
            assert "green_square_001.png" in page.text_content("#query-caption")
            assert page.text_content("#index").startswith("Flat")
            assert re.fullmatch(r"[\d.]+ m?s", page.text_content("#time"))
            assert page.text_content("#notes") == ""
            assert page.is_enabled("#next") and page.is_disabled("#prev")
            wait_images()
            thumb = page.get_attribute("#results .hit img", "src")
            assert thumb == f"api/rows/{row}/thumbnail?size=256&token={TOKEN}"
            keep_screenshot(page, artifacts / "serve.png", DOCS / "serve.png")

            # 2. clicking a hit searches from its row, itself left out
            clicked = hits[2]["row"]
            page.click(f'#results .hit[data-row="{clicked}"]')
            hits = wait_search()
            assert page.get_attribute("#drop", "data-query") == f"row:{clicked}"
            assert f"api/rows/{clicked}/thumbnail" in page.get_attribute("#query-img", "src")
            assert hits[0]["row"] != clicked and clicked not in [h["row"] for h in hits]
            expected = api(server, "/api/search", {"rows": [clicked], "exclude_self": True, "k": K})
            assert [h["row"] for h in hits] == [h["row"] for h in expected["results"][0]]
            wait_images()

            # 3. the label filter: every hit has the label
            page.select_option("#label", "red_disc")
            hits = wait_search()
            assert hits and all(h["label"] == "red_disc" for h in hits)
            assert len(hits) == 12 - (api(server, f"/api/rows/{clicked}")["label"] == "red_disc")
            assert page.is_disabled("#next")
            page.select_option("#label", "")  # all again
            wait_search()
            page.select_option("#split", "val")
            val = wait_search()
            assert val and all(h["split"] == "val" for h in val)
            page.select_option("#split", "")
            first = wait_search()
            assert len(first) == K and {h["label"] for h in first} == {"red_disc", "green_square", "blue_stripes"}

            # 4. paging: 35 other rows, 24 on page 1 and 11 on page 2
            page.click("#next")
            second = wait_search()
            assert len(second) == 36 - 1 - K
            assert page.text_content("#results .hit .rank") == str(K + 1)
            assert page.text_content("#page") == "page 2"
            assert page.is_disabled("#next") and page.is_enabled("#prev")
            assert {h["row"] for h in first} | {h["row"] for h in second} == set(range(36)) - {clicked}
            page.click("#prev")
            assert wait_search() == first
            assert page.is_disabled("#prev")

            # 5. a file that is no image: the error box says why; the grid stays; the page still works
            page.set_input_files("#file", str(not_image))
            page.wait_for_selector('#results[data-state="error"]')
            assert page.is_visible("#error")
            assert "notes.txt is not an image" in page.text_content("#error")
            assert page.eval_on_selector_all("#results .hit", "els => els.length") == K
            assert page.get_attribute("#drop", "data-query") == f"row:{clicked}"
            page.evaluate("""([data, name]) => {  // an image file dropped on the page
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                const files = new DataTransfer();
                files.items.add(new File([bytes], name, {type: "image/png"}));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", {
                    dataTransfer: files, bubbles: true, cancelable: true}));
            }""", [base64.b64encode((collection / other).read_bytes()).decode(), Path(other).name])
            hits = wait_search()
            assert page.is_hidden("#error")
            assert hits[0]["row"] == other_row and hits[0]["score"] == "1.000"
            assert page.get_attribute("#drop", "data-query") == "image"
            page.click("#random")
            hits = wait_search()
            start = int(page.get_attribute("#drop", "data-query").removeprefix("row:"))
            assert 0 <= start < 36 and start not in [h["row"] for h in hits]
            # FastAPI's validation errors (a list) read as messages too
            assert page.evaluate("detailMessage([{loc: ['body', 'k'], msg: 'Input should be >= 1'}], 422)") == \
                "k: Input should be >= 1"

            # 6. without the token: the error box says what is missing
            bare = browser.new_page(viewport={"width": 1280, "height": 900})
            watch(bare)
            bare.goto(f"{server}/")
            bare.wait_for_selector("#error:not([hidden])")
            assert "needs its token" in bare.text_content("#error")
            bare.close()

            # 7. text queries: the box shows for a space with a text tower (/api/info says so here), and
            # its search reaches the server, which answers that the tiny network has no text tower
            text = browser.new_page(viewport={"width": 1280, "height": 900})
            watch(text)

            def text_tower(route: Any) -> None:
                res = route.fetch()
                info = res.json()
                info["spaces"][0]["text_queries"] = True
                route.fulfill(response=res, json=info)

            text.route("**/api/info*", text_tower)
            text.goto(f"{server}/?token={TOKEN}")
            text.wait_for_selector("#text-box:not([hidden])")
            text.fill("#text", "a red disc")
            with text.expect_request("**/api/search") as sent:
                text.press("#text", "Enter")
            assert sent.value.post_data_json == {"k": K, "offset": 0, "where": {}, "space": space,
                                                 "texts": ["a red disc"]}
            text.wait_for_selector('#results[data-state="error"]')
            assert "no text tower" in text.text_content("#error")
            text.close()
        finally:
            browser.close()

    assert page_errors == []
    # Chromium logs the refused requests (the upload, the missing token, the text): nothing else
    assert all(e.startswith("Failed to load resource: the server responded with a status of 4")
               for e in console_errors), console_errors
    outside = [u for u in requests if not u.startswith(server + "/") and not u.startswith(("blob:", "data:"))]
    assert outside == [], outside
    assert any(u.startswith(f"{server}/api/rows/{row}/thumbnail") and f"token={TOKEN}" in u for u in requests)
