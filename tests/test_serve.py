"""The search server's JSON API in process (FastAPI's TestClient over the real app and a real store):
answers equal a local search, uploads, pages, heads, the store followed while serving, and every
kind of bad input answered with a 4xx that names it, the server answering on afterwards."""
from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embedstore
from embedstore.serve.app import create_app
from embedstore.serve.embed import MicroBatcher
from embedstore.serve.state import ServedStore, ServeOptions
from imagegen import TINY_BACKBONE, draw_image

fastapi_testclient = pytest.importorskip("fastapi.testclient")


def client_for(store: Path, **options: Any) -> Any:
    token = options.pop("token", None)
    served = ServedStore(store, ServeOptions(refresh_seconds=0, **options))
    return fastapi_testclient.TestClient(create_app(served, token=token)), served


def first_png(collection: Path) -> Path:
    return sorted(collection.rglob("*.png"))[0]


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header declaring 900M pixels, with a tiny body: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_row_search_equals_local_search(tiny_store: Path) -> None:
    c, _ = client_for(tiny_store)
    with c:
        got = c.post("/api/search", json={"rows": [0, 5], "k": 4, "where": {"split": "val"}}).json()
    local = embedstore.search.search(tiny_store, rows=[0, 5], k=4, where={"split": "val"})
    assert got["results"] == local["results"] and got["queries"] == local["queries"]
    assert all(h["path"].startswith("val/") for hits in got["results"] for h in hits)


def test_uploaded_image_finds_itself_first_and_exclude_self_drops_it(tiny_store: Path, collection: Path) -> None:
    image = first_png(collection)
    row = int(embedstore.open_store(tiny_store).rows_of([str(image.relative_to(collection))])[0])
    c, _ = client_for(tiny_store)
    with c:
        hits = c.post("/api/search/image?k=3", files={"file": (image.name, image.read_bytes())}).json()["results"][0]
        assert hits[0]["row"] == row and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
        without = c.post("/api/search/image?k=3&exclude_self=true",
                         files={"file": (image.name, image.read_bytes())}).json()["results"][0]
    assert row not in [h["row"] for h in without] and len(without) == 3
    assert [h["row"] for h in without[:2]] == [h["row"] for h in hits[1:3]]


def test_pages_concatenate_to_one_long_result(tiny_store: Path) -> None:
    c, _ = client_for(tiny_store)
    with c:
        whole = c.post("/api/search", json={"rows": [7], "k": 12}).json()["results"][0]
        pages = [c.post("/api/search", json={"rows": [7], "k": 4, "offset": o}).json()["results"][0] for o in (0, 4, 8)]
    assert [h["row"] for p in pages for h in p] == [h["row"] for h in whole]


def test_vector_and_path_queries(tiny_store: Path) -> None:
    st = embedstore.open_store(tiny_store)
    sp = st.space()
    v = np.asarray(sp.vectors[3:4], np.float32)
    c, _ = client_for(tiny_store)
    with c:
        by_vec = c.post("/api/search", json={"vectors": v.tolist(), "k": 1}).json()["results"][0]
        path = str(sp.column("path", np.array([3]))[0])
        by_path = c.post("/api/search", json={"paths": [path], "k": 1}).json()["results"][0]
    assert by_vec[0]["row"] == by_path[0]["row"] == int(sp.rows[3])


@pytest.mark.parametrize("body,status,words", [
    ({"rows": [0], "k": 0}, 422, "k"),
    ({"rows": [0], "k": 5000}, 400, "limit"),
    ({"rows": [10**9], "k": 3}, 404, "row 1000000000"),
    ({"rows": [0], "space": "nope"}, 404, "no space 'nope'"),
    ({"vectors": [[1.0, 2.0]]}, 400, "dimension"),
    ({"rows": [0], "paths": ["a.png"]}, 400, "exactly one kind"),
    ({}, 400, "exactly one kind"),
    ({"rows": [0], "where": {"label": "no-such"}}, 400, "labels are"),
    ({"rows": [0], "bogus": True}, 422, "bogus"),
    ({"paths": ["not/stored.png"]}, 404, "not/stored.png"),
])
def test_bad_json_queries_get_4xx_naming_the_problem(tiny_store: Path, body: dict, status: int, words: str) -> None:
    c, _ = client_for(tiny_store)
    with c:
        r = c.post("/api/search", json=body)
        assert r.status_code == status, r.text
        assert words in str(r.json()["detail"])
        assert c.post("/api/search", json={"rows": [0], "k": 1}).status_code == 200  # still serving


def test_nan_and_zero_vectors_are_refused(tiny_store: Path) -> None:
    dim = embedstore.open_store(tiny_store).space().dim
    c, _ = client_for(tiny_store)
    with c:
        nan = c.post("/api/search", content=('{"vectors": [[NaN' + ", 0.5" * (dim - 1) + "]]}").encode(),
                     headers={"content-type": "application/json"})
        zero = c.post("/api/search", json={"vectors": [[0.0] * dim]})
    assert nan.status_code == 400 and "NaN" in nan.json()["detail"]
    assert zero.status_code == 400 and "all zeros" in zero.json()["detail"]


@pytest.mark.parametrize("name,data,words", [
    ("notes.txt", b"just some text, not an image", "not an image"),
    ("empty.png", b"", "empty"),
    ("bomb.png", png_bomb(), "decompression bomb"),
])
def test_bad_uploads_get_422(tiny_store: Path, name: str, data: bytes, words: str) -> None:
    c, _ = client_for(tiny_store)
    with c:
        r = c.post("/api/search/image", files={"file": (name, data)})
        assert r.status_code == 422 and words in r.json()["detail"], r.text
        assert c.get("/api/info").status_code == 200


def test_truncated_upload_and_oversized_body(tiny_store: Path, collection: Path) -> None:
    data = first_png(collection).read_bytes()
    c, _ = client_for(tiny_store, max_upload_bytes=len(data) + 10)
    with c:
        r = c.post("/api/search/image", files={"file": ("cut.png", data[: len(data) // 2])})
        assert r.status_code == 422 and "truncated" in r.json()["detail"]
        big = c.post("/api/search/image", files={"file": ("big.png", data + b"\0" * (3 << 20))})
        assert big.status_code == 413 and "limit" in big.json()["detail"]
        assert c.post("/api/search/image", files={"file": ("ok.png", data)}).status_code == 200


def test_token_guards_the_api_but_not_the_page(tiny_store: Path) -> None:
    c, _ = client_for(tiny_store, token="s3cret")
    with c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/rows/0/thumbnail?token=s3cret").status_code == 200
        assert c.get("/").status_code == 200 and c.get("/openapi.json").status_code == 200


def test_row_images_come_from_inside_the_root_only(tiny_store: Path, collection: Path, tmp_path: Path) -> None:
    c, _ = client_for(tiny_store)
    with c:
        thumb = c.get("/api/rows/0/thumbnail?size=32")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        from PIL import Image
        import io
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 32
        path = c.get("/api/rows/1").json()["path"]
        assert c.get("/api/rows/1/image").content == (collection / path).read_bytes()
        outside = tmp_path / "secret.png"
        draw_image("red_disc", 1).save(outside)
        (collection / path).unlink()
        (collection / path).symlink_to(outside)  # the stored path now leads out of the root
        r = c.get("/api/rows/1/image")
        assert r.status_code == 403 and "outside the collection root" in r.json()["detail"]
        assert c.get("/api/rows/99999/thumbnail").status_code == 404


def test_predict_with_a_saved_head(tiny_store: Path, collection: Path, tmp_path: Path) -> None:
    report = embedstore.classify(str(tiny_store), models=["logreg"])
    folder = Path(report.save_head(str(tmp_path / "head"), model="logreg"))
    head = embedstore.load_head(folder)
    sp = embedstore.open_store(tiny_store).space()
    c, _ = client_for(tiny_store, heads={"shapes": folder})
    with c:
        got = c.post("/api/predict", json={"head": "shapes", "rows": [0, 20]}).json()["predictions"]
        image = first_png(collection)
        up = c.post("/api/predict/image?head=shapes", files={"file": (image.name, image.read_bytes())}).json()
        assert c.post("/api/predict", json={"head": "nope", "rows": [0]}).status_code == 404
        assert c.get("/api/info").json()["heads"][0]["classes"] == head.classes
    expected = head.predict(np.asarray(sp.vectors[sp.positions_of([0, 20])], np.float32))
    assert [p["label"] for p in got] == list(expected)
    assert up["predictions"][0]["label"] == image.parent.name


def _add_images(collection: Path, tiny_store: Path) -> list[str]:
    new = collection / "train" / "late"
    new.mkdir()
    for i in range(4):
        draw_image("green_square", 900 + i).save(new / f"late_{i}.png")
    embedstore.embed(collection, tiny_store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    return [f"train/late/late_{i}.png" for i in range(4)]


def test_rows_added_while_serving_are_found_through_a_stale_index(tiny_store: Path, collection: Path) -> None:
    embedstore.build_index(tiny_store, kind="flat")
    c, served = client_for(tiny_store, reindex=False)
    with c:
        before = c.get("/api/info").json()["images"]
        paths = _add_images(collection, tiny_store)
        assert served.refresh()
        info = c.get("/api/info").json()
        assert info["images"] == before + 4 and info["spaces"][0]["index"]["rows"] == before
        got = c.post("/api/search", json={"paths": paths, "k": 6}).json()
    exact = embedstore.search.search(tiny_store, paths=paths, k=6, exact=True)
    assert [[h["row"] for h in hits] for hits in got["results"]] == [[h["row"] for h in hits] for hits in exact["results"]]


def test_a_stale_index_is_brought_up_to_date_in_the_background(tiny_store: Path, collection: Path) -> None:
    embedstore.build_index(tiny_store, kind="flat")
    served = ServedStore(tiny_store, ServeOptions(refresh_seconds=0.2))
    served.start()
    try:
        before = served.store.n_images
        _add_images(collection, tiny_store)
        deadline = time.time() + 60
        while time.time() < deadline:
            st, indexes = served.snapshot()
            if st.n_images == before + 4 and indexes[st.space().name].info["rows"] == st.n_images:
                break
            time.sleep(0.1)
        st, indexes = served.snapshot()
        assert st.n_images == before + 4 and indexes[st.space().name].info["rows"] == st.n_images, served.events
        events = [e["event"] for e in served.events if e["event"] in ("store changed", "index updated")]
        # an embed run may publish more than once (journal parts, then the fold): one change or several
        assert events[0] == "store changed" and "index updated" in events
    finally:
        served.close()


def test_search_merges_a_stale_index_with_exact_search_of_the_new_rows(tiny_store: Path, collection: Path) -> None:
    embedstore.build_index(tiny_store, kind="flat")
    _add_images(collection, tiny_store)
    got = embedstore.search.search(tiny_store, rows=list(range(0, 40, 3)), k=8)
    exact = embedstore.search.search(tiny_store, rows=list(range(0, 40, 3)), k=8, exact=True)
    assert got["index"] is not None and any("out of date" in n for n in got["notes"])
    assert [[h["row"] for h in r] for r in got["results"]] == [[h["row"] for h in r] for r in exact["results"]]


def test_micro_batcher_batches_concurrent_requests() -> None:
    import torch

    def slow_double(x: torch.Tensor) -> np.ndarray:
        time.sleep(0.05)
        return (x * 2).numpy()

    batcher = MicroBatcher(slow_double, max_batch=8)
    out: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, batcher(torch.full((3,), float(i)))))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert all(np.array_equal(out[i], np.full(3, 2.0 * i)) for i in range(16))
    assert batcher.items == 16 and batcher.batches < 16


def test_micro_batcher_hands_an_error_to_every_waiting_request() -> None:
    import torch

    def broken(x: torch.Tensor) -> np.ndarray:
        raise RuntimeError("model failed")

    batcher = MicroBatcher(broken)
    with pytest.raises(RuntimeError, match="model failed"):
        batcher(torch.zeros(2))
    batcher.fn = lambda x: x.numpy()
    assert np.array_equal(batcher(torch.ones(2)), np.ones(2))  # the thread lives on
    batcher.close()


def test_text_queries_on_an_open_clip_space_equal_a_local_text_search(tmp_path: Path, tiny_store: Path) -> None:
    from support.tiny_clip import embed_tiny_clip

    _, store = embed_tiny_clip(tmp_path / "clip")
    texts = ["a photo of a red disc", "a photo of green squares"]
    c, _ = client_for(store)
    with c:
        assert c.get("/api/info").json()["spaces"][0]["text_queries"] is True
        got = c.post("/api/search", json={"texts": texts, "k": 5, "where": {"split": "val"}}).json()
    local = embedstore.search.search(store, texts=texts, k=5, where={"split": "val"})
    assert [[h["row"] for h in r] for r in got["results"]] == [[h["row"] for h in r] for r in local["results"]]
    assert [q["query"] for q in got["queries"]] == [f"text: {t}" for t in texts]
    c2, _ = client_for(tiny_store)
    with c2:
        assert c2.get("/api/info").json()["spaces"][0]["text_queries"] is False
        r = c2.post("/api/search", json={"texts": ["a cat"]})
        assert r.status_code == 400 and "text tower" in r.json()["detail"]


def test_pages_say_whether_more_follow_and_hits_carry_their_split(tiny_store: Path) -> None:
    c, _ = client_for(tiny_store)
    with c:
        first = c.post("/api/search", json={"rows": [7], "k": 20, "exclude_self": True}).json()
        last = c.post("/api/search", json={"rows": [7], "k": 20, "offset": 20, "exclude_self": True}).json()
        val = c.post("/api/search", json={"rows": [7], "k": 5, "where": {"split": "val"}}).json()
    n = embedstore.open_store(tiny_store).n_images
    assert first["more"] and first["available"] == n - 1 and len(first["results"][0]) == 20
    assert not last["more"] and len(last["results"][0]) == n - 1 - 20
    assert {h["split"] for h in val["results"][0]} == {"val"} and val["more"] == (val["available"] > 5)


def test_the_openapi_page_works_offline(tiny_store: Path) -> None:
    """/docs names only files the server itself sends (Swagger UI from the package, not a CDN)."""
    import re

    c, _ = client_for(tiny_store, token="t")
    with c:
        page = c.get("/docs")
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert page.status_code == 200 and any(a.endswith(".js") for a in assets)
        assert all(a.startswith("/") and c.get(a).status_code == 200 for a in assets), assets
        paths = c.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/predict", "/api/info"} <= set(paths)
