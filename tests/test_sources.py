"""Input sources beyond folders (issue 20, "In"): webdataset tar shards, CSV/Parquet tables of paths and
URLs (a local HTTP server, memory:// fsspec), and Hugging Face datasets. Each embeds, reruns
incrementally, and records what it cannot read as a failure without stopping the run."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import embedstore
from embedstore.data import Fetch, discover
from embedstore.errors import CollectionError, EmbedOptionError
from embedstore.pipeline.plan import rebase
from embedstore_cli.main import main
from imagegen import TINY_BACKBONE
from sourcegen import STYLES, ImageServer, add_member, hf_dataset, image_bytes, write_shard

TINY = dict(backbone=TINY_BACKBONE, weights="random", workers=0, progress=False, batch_size=8)
FAST = Fetch(timeout=0.8, retries=1, backoff=0.05)


def _failures(store: Path) -> dict[str, str]:
    return {f["path"]: f["error"] for f in embedstore.open_store(store).failures}


def _counts(summary: dict) -> tuple[int, int, int, int]:
    return summary["embedded"], summary["failed"], summary["unchanged"], summary["known_failures"]


# ------------------------------------------------------------------ tar shards


def test_folder_of_shards_embeds_labels_and_reruns_incrementally(tmp_path: Path):
    root = tmp_path / "shards"
    write_shard(root / "train" / "shard-000.tar", 0, 4)
    write_shard(root / "val" / "shard-001.tar", 4, 3, label="json")
    (root / "old.tar.gz").write_bytes(b"\x1f\x8b\x08 not readable by offset")
    _, items = discover(root)
    got = {it.rel: (it.label, it.split) for it in items if not it.refusal}
    assert got == {**{f"train/shard-000.tar/sample{i:05d}.jpg": (STYLES[i % 3], "train") for i in range(4)},
                   **{f"val/shard-001.tar/sample{i:05d}.jpg": (STYLES[i % 3], "val") for i in range(4, 7)}}
    store = tmp_path / "s.h5"
    assert _counts(embedstore.embed(root, store, **TINY)) == (7, 1, 0, 0)
    assert _failures(store) == {"old.tar.gz": "TarShardError"}
    assert "decompress" in embedstore.open_store(store).failures[0]["message"]
    sp = embedstore.open_store(store).space()
    assert sorted(sp.labels) == sorted(STYLES[i % 3] for i in range(7))
    assert _counts(embedstore.embed(root, store, **TINY)) == (0, 0, 7, 1)

    # the shard rewritten: one member's image changed, one only touched (new mtime, same bytes), one added
    before = dict(zip(sp.paths, sp.vectors))
    write_shard(root / "train" / "shard-000.tar", 0, 5, changed={2: image_bytes(50)}, mtimes={1: 1_800_000_000})
    again = embedstore.embed(root, store, **TINY)
    assert _counts(again) == (2, 0, 6, 1), again
    after = embedstore.open_store(store).space()
    now = dict(zip(after.paths, after.vectors))
    key = "train/shard-000.tar/sample{:05d}.jpg".format
    assert key(4) in now and len(now) == 8
    assert (now[key(2)] != before[key(2)]).any() and (now[key(1)] == before[key(1)]).all()


def test_single_shard_damage_and_refusals(tmp_path: Path):
    shard = write_shard(tmp_path / "one.tar", 0, 3)
    root, items = discover(shard)
    assert root == str(tmp_path.resolve()) and [it.rel for it in items] == [
        f"one.tar/sample{i:05d}.jpg" for i in range(3)]
    # a label file that is not JSON refuses its image; a member cut off by a truncated shard is refused too
    with tarfile.open(tmp_path / "odd.tar", "w") as tf:
        add_member(tf, "a.jpg", image_bytes(0))
        add_member(tf, "a.json", b"{not json")
        add_member(tf, "b.png", image_bytes(1, "PNG"))
        add_member(tf, "b.seg.png", image_bytes(2, "PNG"))  # a compound extension: not an image of its own
        add_member(tf, "c.jpg", image_bytes(2))
    data = (tmp_path / "odd.tar").read_bytes()
    cut = data.index(image_bytes(2)) + 100
    (tmp_path / "odd.tar").write_bytes(data[:cut])
    _, items = discover(tmp_path / "odd.tar")
    refused = {it.rel: it.refusal for it in items if it.refusal}
    assert [it.rel for it in items if not it.refusal] == ["odd.tar/b.png"]
    assert "not valid JSON" in refused["odd.tar/a.jpg"] and "ends before" in refused["odd.tar/c.jpg"]
    assert "damaged after 5 members" in refused["odd.tar"]  # the shard itself: nothing after c.jpg is listed
    store = tmp_path / "s.h5"
    assert _counts(embedstore.embed(tmp_path / "odd.tar", store, **TINY)) == (1, 3, 0, 0)
    assert set(_failures(store).values()) == {"TarShardError"}
    (tmp_path / "z.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(CollectionError, match="compressed tar shard"):
        discover(tmp_path / "z.tar.gz")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(CollectionError, match="not a readable tar shard"):
        discover(tmp_path / "junk.tar")


def test_member_keys_follow_the_store_root_when_rebased(tmp_path: Path):
    shard = write_shard(tmp_path / "data" / "part" / "s.tar", 0, 1)
    _, items = discover(shard)
    assert rebase(items[0], str(tmp_path / "data")).rel == "part/s.tar/sample00000.jpg"
    url = embedstore.data.ImageItem("https://x/a.jpg", "https://x/a.jpg", source=FAST)
    assert rebase(url, str(tmp_path)) == url


# ------------------------------------------------------------------ URLs over HTTP


def _url_table(tmp_path: Path, server: ImageServer, n_ok: int = 4) -> Path:
    names = [f"/img/{i}.{'png' if i % 2 else 'jpg'}" for i in range(n_ok)]
    names += ["/missing.jpg", "/slow.jpg", "/cut.jpg", "/big.png", "/corrupt.jpg", "/flaky.jpg"]
    rows = ["url,label"] + [f"{server.url}{p},{STYLES[i % 3]}" for i, p in enumerate(names)]
    (tmp_path / "urls.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "urls.csv"


def test_urls_embed_record_failures_and_rerun_without_downloading_again(tmp_path: Path):
    with ImageServer(slow_s=2.5) as server:
        table = _url_table(tmp_path, server)
        store = tmp_path / "s.h5"
        first = embedstore.embed(table, store, fetch=FAST, max_bytes=200_000, **TINY)
        assert _counts(first) == (5, 5, 0, 0), first  # 4 images and the flaky one (503, then retried)
        u = server.url
        assert _failures(store) == {f"{u}/missing.jpg": "DownloadError", f"{u}/slow.jpg": "TransientDownloadError",
                                    f"{u}/cut.jpg": "TransientDownloadError", f"{u}/big.png": "FileTooLargeError",
                                    f"{u}/corrupt.jpg": "OSError"}
        messages = {f["path"]: f["message"] for f in embedstore.open_store(store).failures}
        assert "HTTP 404" in messages[f"{u}/missing.jpg"] and "retried on the next run" in messages[f"{u}/slow.jpg"]
        assert server.hits["/flaky.jpg"] == 2 and server.hits["/slow.jpg"] == 2  # one retry each
        sp = embedstore.open_store(store).space()
        assert f"{u}/img/1.png" in set(sp.paths) and set(sp.labels) <= set(STYLES)

        hits = dict(server.hits)
        again = embedstore.embed(table, store, fetch=FAST, max_bytes=200_000, **TINY)
        assert _counts(again) == (0, 2, 5, 3), again  # only the transient failures are tried again
        fetched = {p for p in server.hits if server.hits[p] > hits.get(p, 0)}
        assert fetched == {"/slow.jpg", "/cut.jpg"}


def test_urls_download_concurrently(tmp_path: Path):
    """Eight slow URLs in one batch take about one slow answer, not eight."""
    with ImageServer(slow_s=0.6) as server:
        (tmp_path / "slow.csv").write_text("".join(f"{server.url}/slow.jpg?{i}\n" for i in range(8)))
        summary = embedstore.embed(tmp_path / "slow.csv", tmp_path / "s.h5", fetch=Fetch(timeout=5), **TINY)
        assert summary["embedded"] == 8 and len(server.hits) == 8
        assert summary["stages"]["embed"] < 0.6 * 8 * 0.6, "downloads ran one after another"


# ------------------------------------------------------------------ tables: memory:// fsspec, Parquet, columns


def _memory_files(prefix: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"{prefix}/images/{i}.jpg", image_bytes(i))


def test_memory_parquet_with_named_columns_and_relative_urls(tmp_path: Path):
    import fsspec

    _memory_files("/es-test-pq")
    local = tmp_path / "local.png"
    local.write_bytes(image_bytes(5, "PNG"))
    table = pa.table({"img": ["memory://es-test-pq/images/0.jpg", "images/1.jpg", f"file://{local}",
                              "memory://es-test-pq/images/gone.jpg"],
                      "category": ["a", "b", "c", "d"], "part": ["train", "validation", "test", "train"]})
    with fsspec.open("memory://es-test-pq/lists/t.parquet", "wb") as f:
        pq.write_table(table, f)
    with pytest.raises(CollectionError, match=r"no column names the images \(its columns are img, category, part\)"
                                              r".*--path-column"):
        discover("memory://es-test-pq/lists/t.parquet")
    columns = {"path": "img", "label": "category", "split": "part"}
    _, items = discover("memory://es-test-pq/lists/t.parquet", columns=columns)
    assert [(it.rel, it.split) for it in items] == [
        ("memory://es-test-pq/images/0.jpg", "train"), ("memory://es-test-pq/lists/images/1.jpg", "val"),
        (f"file://{local}", "test"), ("memory://es-test-pq/images/gone.jpg", "train")]
    fsspec.filesystem("memory").pipe("/es-test-pq/lists/images/1.jpg", image_bytes(1))
    store = tmp_path / "s.h5"
    assert _counts(embedstore.embed("memory://es-test-pq/lists/t.parquet", store, columns=columns, **TINY)) == (
        3, 1, 0, 0)
    assert _failures(store) == {"memory://es-test-pq/images/gone.jpg": "DownloadError"}
    assert dict(zip(*[embedstore.open_store(store).space().paths, embedstore.open_store(store).space().labels]))[
        f"file://{local}"] == "c"
    assert _counts(embedstore.embed("memory://es-test-pq/lists/t.parquet", store, columns=columns, **TINY)) == (
        0, 0, 3, 1)
    with pytest.raises(EmbedOptionError, match="takes keys path, label, split"):
        discover("memory://es-test-pq/lists/t.parquet", columns={"image": "img"})


def test_cli_table_columns_urls_and_errors(tmp_path: Path):
    _memory_files("/es-test-cli")
    (tmp_path / "list.csv").write_text("memory://es-test-cli/images/0.jpg,red\nmemory://es-test-cli/images/1.jpg,g\n")
    args = ["--backbone", TINY_BACKBONE, "--weights", "random", "--workers", "0", "--quiet", "--json"]
    res = CliRunner().invoke(main, ["embed", str(tmp_path / "list.csv"), *args])  # headerless, URLs
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["embedded"] == 2
    pq.write_table(pa.table({"id": [1], "where": ["memory://es-test-cli/images/2.jpg"]}), tmp_path / "t.parquet")
    res = CliRunner().invoke(main, ["embed", str(tmp_path / "t.parquet"), *args])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "its columns are id, where" in res.output and "--path-column" in res.output
    res = CliRunner().invoke(main, ["embed", str(tmp_path / "t.parquet"), "--path-column", "where", *args])
    assert res.exit_code == 0 and json.loads(res.output)["embedded"] == 1, res.output
    res = CliRunner().invoke(main, ["embed", str(tmp_path / "t.parquet"), "--path-column", "nope", *args])
    assert res.exit_code == 1 and "has no column 'nope' (--path-column)" in res.output, res.output
    try:
        import s3fs  # noqa: F401
    except ImportError:
        (tmp_path / "s3.csv").write_text("path\ns3://bucket/a.jpg\n")
        res = CliRunner().invoke(main, ["embed", str(tmp_path / "s3.csv"), *args])
        assert res.exit_code == 1 and "s3fs" in res.output and "line 2" in res.output, res.output


# ------------------------------------------------------------------ Hugging Face datasets


def test_hf_dataset_embeds_with_class_names_and_reruns(tmp_path: Path):
    pytest.importorskip("datasets")
    ds = hf_dataset(6)
    ds.info.dataset_name = "shapes"
    store = tmp_path / "s.h5"
    assert _counts(embedstore.embed(ds, store, **TINY)) == (6, 0, 0, 0)
    sp = embedstore.open_store(store).space()
    assert list(sp.paths) == [f"shapes/{i}" for i in range(6)]
    assert list(sp.labels) == [STYLES[i % 3] for i in range(6)]
    assert _counts(embedstore.embed(ds, store, **TINY)) == (0, 0, 6, 0)
    keyed = embedstore.embed(ds, store, columns={"key": "id"}, **TINY)
    assert keyed["embedded"] == 6 and "shapes/img-0003" in set(embedstore.open_store(store).space().paths)
    # the same images embedded from files give the same vectors as from the dataset's bytes
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "0.png").write_bytes(ds.cast_column("image", type(ds.features["image"])(decode=False))[0]["image"]["bytes"])
    from_file = embedstore.embed(folder, tmp_path / "f.h5", **TINY)
    assert from_file["embedded"] == 1
    import numpy as np

    np.testing.assert_array_equal(embedstore.open_store(tmp_path / "f.h5").space().vectors[0], sp.vectors[0])
    with pytest.raises(CollectionError, match=r"no Image column.*label \(ClassLabel\)"):
        discover(ds.remove_columns("image"))


def test_hf_dataset_split_and_missing_image(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": image_bytes(0), "path": None}, None,
                                                 {"bytes": None, "path": str(tmp_path / "x.jpg")}]},
                                    features=datasets.Features({"picture": datasets.Image()}),
                                    split=datasets.Split.VALIDATION)
    (tmp_path / "x.jpg").write_bytes(image_bytes(4))
    _, items = discover(ds)
    assert [(it.rel, it.split, bool(it.refusal)) for it in items] == [
        ("dataset/validation/0", "val", False), ("dataset/validation/1", "val", True),
        ("dataset/validation/2", "val", False)]
    assert _counts(embedstore.embed(ds, tmp_path / "s.h5", **TINY)) == (2, 1, 0, 0)
    with pytest.raises(EmbedOptionError, match="takes keys image, label, split, key"):
        discover(ds, columns={"path": "picture"})


def test_engine_ray_refuses_what_it_cannot_carry(tmp_path: Path):
    pytest.importorskip("datasets")
    with pytest.raises(EmbedOptionError, match="not a Dataset"):
        embedstore.embed(hf_dataset(1), tmp_path / "s.h5", engine="ray", progress=False)
    with pytest.raises(EmbedOptionError, match="columns and fetch"):
        embedstore.embed(tmp_path, tmp_path / "s.h5", engine="ray", columns={"path": "x"}, progress=False)


def test_reader_reads_a_batch_of_each_kind(tmp_path: Path):
    """__getitems__ (torch's batched fetch) gives the same results as one item at a time."""
    from embedstore.data.reader import ImageReader

    shard = write_shard(tmp_path / "s.tar", 0, 2)
    _memory_files("/es-test-reader")
    items = discover(shard)[1] + [embedstore.data.ImageItem(u, u, source=FAST) for u in
                                  ("memory://es-test-reader/images/0.jpg", "memory://es-test-reader/images/1.jpg")]
    reader = ImageReader(items, lambda im: im, None)
    reader.decode = lambda data: data[:4]  # the bytes' head, not pixels: the read is under test
    batch = reader.__getitems__(list(range(len(items))))
    single = [reader[i] for i in range(len(items))]
    assert [(r.hash, r.size, r.error) for r in batch] == [(r.hash, r.size, r.error) for r in single]
    assert all(r.hash and not r.error for r in batch) and os.path.exists(shard)
