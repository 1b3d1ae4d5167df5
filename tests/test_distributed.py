"""Scale-out: shards + merge equal one local run; the Ray engine equals the local engine, also when
a worker dies mid-shard; the on-disk IVF recipe over shard files finds the exact neighbours."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import embedstore
from embedstore.index import build_ivf_on_disk, search_ivf_on_disk
from embedstore.pipeline import merge, ray_runner, shards as dist
from embedstore.store import FAILURE_COLUMNS, IMAGE_COLUMNS, open_store, write_file
from embedstore_cli.main import main
from embedstore_cli.scale_commands import register
from imagegen import TINY_BACKBONE, draw_image, make_collection

register(main)
TINY: dict[str, Any] = dict(backbone=TINY_BACKBONE, weights="random", workers=0, progress=False, precision="fp32")
META = ("label", "split", "size", "hash", "mtime")


def schema(path: Path) -> set[tuple]:
    """Every group/dataset name with dtype kind and rank, and attribute names (minus timestamps)."""
    out: set[tuple] = set()
    with h5py.File(path, "r") as f:
        out |= {("attr", "/", k) for k in f.attrs if k not in ("created", "journal_seq")}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                out.add(("dataset", name, obj.dtype.kind, obj.ndim))
            out.update(("attr", name, k) for k in obj.attrs)

        f.visititems(visit)
    return out


def contents(path: Path) -> tuple[dict, dict, set, dict]:
    """(path -> metadata, path -> float32 vector, failures, space attrs); checks for duplicates."""
    st = open_store(path)
    sp = st.space()
    assert len(set(st.images["path"])) == st.n_images, "duplicate image rows"
    assert len(set(sp.rows.tolist())) == len(sp) and len(set(sp.paths)) == len(sp), "duplicate vectors"
    meta = {p: tuple(st.images[c][i] for c in META) for i, p in enumerate(st.images["path"])}
    vectors = dict(zip(sp.paths, sp.vectors.astype(np.float32)))
    failures = {(f["path"], f["space"], f["error"]) for f in st.failures}
    attrs = {k: sp.attrs[k] for k in ("backbone", "weights_sha256", "dim", "dtype", "precision", "pooling")}
    return meta, vectors, failures, attrs


def assert_same_store(expected: Path, actual: Path) -> None:
    """Same rows, metadata, failures and schema; vectors equal within float16/bf16 tolerance."""
    m1, v1, f1, a1 = contents(expected)
    m2, v2, f2, a2 = contents(actual)
    assert m1 == m2 and f1 == f2 and a1 == a2
    assert set(v1) == set(v2)
    for p in v1:
        np.testing.assert_allclose(v2[p], v1[p], rtol=1e-2, atol=2e-3, err_msg=p)
    assert schema(expected) == schema(actual)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 generated images in train/val/<class>/ plus one undecodable file."""
    root = make_collection(tmp_path_factory.mktemp("dist") / "imgs", per_class=8)
    (root / "train" / "red_disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    """The local engine's store of ``images``."""
    store = tmp_path_factory.mktemp("ref") / "local.h5"
    embedstore.embed(images, store, **TINY)
    return store


# --------------------------------------------------------------------------- without Ray


def test_shard_assignment_is_stable_balanced_and_checked():
    names = [f"train/class_{c}/img_{k:05d}.jpg" for c in range(5) for k in range(400)]
    before = {p: dist.shard_of(p, 8) for p in names}
    more = names + [f"train/class_new/img_{k:05d}.jpg" for k in range(500)]
    assert all(dist.shard_of(p, 8) == before[p] for p in names)  # adding files moves nothing
    counts = np.bincount([dist.shard_of(p, 8) for p in more], minlength=8)
    assert counts.min() > 0.8 * len(more) / 8 and counts.max() < 1.2 * len(more) / 8
    assert dist.parse_shard("3/16") == (3, 16) and dist.parse_shard((0, 1)) == (0, 1)
    for bad in ("16/16", "a/b", "0/0", "-1/4"):
        with pytest.raises(ValueError, match="shard"):
            dist.parse_shard(bad)


def test_shards_then_merge_equal_a_single_run(tmp_path: Path, images: Path, reference: Path):
    store = tmp_path / "sharded.h5"
    seen: list[str] = []
    for i in range(3):
        out = embedstore.embed(images, store, shard=(i, 3), **TINY)
        assert out["shard"] == f"{i}/3" and not out["shard_skipped"]
        published = dist.shard_file(store, i, 3)
        assert Path(out["shard_file"]) == published and published.is_file()
        assert not dist.work_file(store, i, 3).exists() and not store.exists()
        part = open_store(published)
        assert all(dist.shard_of(p, 3) == i for p in part.images["path"])
        seen += list(part.images["path"]) + [f["path"] for f in part.failures]
    assert sorted(seen) == sorted(open_store(reference).images["path"].tolist() + ["train/red_disc/broken.jpg"])

    again = embedstore.embed(images, store, shard=(1, 3), **TINY)  # a finished shard is skipped
    assert again["shard_skipped"] and again["embedded"] == 0

    files = [p for _, _, p in dist.published_shards(store)]
    first = merge(store, files, remove=False)
    assert first["merged"] == 3 and first["images"] == 48 and first["failures"] == 1
    assert_same_store(reference, store)
    second = merge(store, expect=3)  # merging the same shards again changes nothing
    assert second["images"] == 48 and second["rows"] == first["rows"]
    assert_same_store(reference, store)
    assert not dist.shards_dir(store).exists()


def test_shard_runs_skip_what_the_store_has(tmp_path: Path, images: Path):
    src = shutil.copytree(images, tmp_path / "imgs")
    store = tmp_path / "s.h5"
    embedstore.embed(src, store, **TINY)
    draw_image("red_disc", 4242).save(src / "val" / "red_disc" / "added.png")
    draw_image("blue_stripes", 77).save(src / "val" / "green_square" / "green_square_000.png")  # changed
    outs = [embedstore.embed(src, store, shard=(i, 2), **TINY) for i in range(2)]
    assert sum(o["embedded"] for o in outs) == 2
    assert sum(o["unchanged"] + o["known_failures"] for o in outs) == 48
    merge(store)
    fresh = tmp_path / "fresh.h5"
    embedstore.embed(src, fresh, **TINY)
    assert_same_store(fresh, store)


def test_cli_shard_jobs_and_merge(tmp_path: Path, images: Path, reference: Path):
    store = tmp_path / "cli.h5"
    runner = CliRunner()
    base = ["--backbone", TINY_BACKBONE, "--weights", "random", "--workers", "0", "--precision", "fp32", "--quiet"]
    res = runner.invoke(main, ["embed", str(images), "--store", str(store), "--shard", "1/2", "--json", *base])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["shard_file"].endswith("shard-00001-of-00002.h5")
    res = runner.invoke(main, ["merge", str(store), "--expect", "2"])
    assert res.exit_code == 1 and "0/2" in res.output and "--shard I/2" in res.output and not store.exists()
    res = runner.invoke(main, ["embed", str(images), "--store", str(store), "--shard", "0/2", *base])
    assert res.exit_code == 0 and "shard-00000-of-00002.h5" in res.output
    res = runner.invoke(main, ["merge", str(store), "--expect", "2"])
    assert res.exit_code == 0 and "merged 2 shard file(s)" in res.output and "0 -> 48 images" in res.output
    assert_same_store(reference, store)

    res = runner.invoke(main, ["embed", str(images), "--store", str(store), "--shards", "4", *base])
    assert res.exit_code == 1 and "--engine ray" in res.output
    res = runner.invoke(main, ["embed", str(images), "--store", str(store), "--shard", "2/2", *base])
    assert res.exit_code == 1 and "out of range" in res.output


def _write_shard(path: Path, vectors: np.ndarray, offset: int) -> None:
    n, dim = vectors.shape
    images = {c: [""] * n for c in IMAGE_COLUMNS}
    images.update(path=[f"img_{offset + j:06d}.jpg" for j in range(n)], size=[1] * n, mtime=[0.0] * n)
    attrs = {"backbone": "toy", "weights_sha256": "0" * 64, "dim": dim, "dtype": "float16"}
    write_file(path, {"root": "/data"}, images, {"toy": (attrs, np.arange(n), vectors.astype(np.float16))},
               {c: [] for c in FAILURE_COLUMNS})


def test_ivf_on_disk_recipe_over_shard_files_is_exact_with_all_lists(tmp_path: Path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    data = (centers[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float16)
    files = []
    for k, (a, b) in enumerate([(0, 1200), (1200, 1900), (1900, 3000)]):
        files.append(tmp_path / f"shard-{k:05d}-of-00003.h5")
        _write_shard(files[-1], data[a:b], a)
    out = tmp_path / "ivf"
    manifest = build_ivf_on_disk(files, out, nlist=16, train_size=1500)
    assert manifest["vectors"] == 3000 and (out / "merged.ivfdata").stat().st_size >= 3000 * 32 * 4
    assert [e["offset"] for e in manifest["files"]] == [0, 1200, 1900]

    x = data.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.choice(3000, 50, replace=False)]
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    scores, ids, where = search_ivf_on_disk(out, queries, k=10, nprobe=16)
    agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert agree >= 0.99
    for gid, (file, row) in zip(ids[0], where[0]):  # ids map back to (shard file, row)
        assert open_store(file).images["path"][row] == f"img_{gid:06d}.jpg"
    _, few, _ = search_ivf_on_disk(out, queries, k=10, nprobe=1)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(few, truth)]) < agree  # probes matter


def test_library_takes_typed_values_and_raises_embedstore_errors(tmp_path: Path, images: Path):
    import inspect

    from embedstore.errors import EmbedOptionError, EmbedstoreError, MissingShardFileError, ShardError

    params = inspect.signature(embedstore.embed).parameters
    assert "discovered" not in params and "preloaded" not in params  # internal: the Ray actor calls the runner
    store = tmp_path / "s.h5"
    with pytest.raises(ShardError, match="parse_shard"):  # the library takes (i, n); the CLI parses "i/n"
        embedstore.embed(images, store, shard="1/3", **TINY)
    with pytest.raises(ShardError, match="out of range"):
        embedstore.embed(images, store, shard=(3, 3), **TINY)
    for bad, match in ((dict(engine="spark"), "engine"), (dict(dtype="int8"), "dtype"),
                       (dict(batch_size=0), "batch_size"), (dict(shards=4), "engine='ray'"),
                       (dict(engine="ray", shard=(0, 2)), "shard")):
        with pytest.raises(EmbedOptionError, match=match):
            embedstore.embed(images, store, **{**TINY, **bad})
    with pytest.raises(MissingShardFileError, match="no shard file"):
        merge(store, [tmp_path / "missing.h5"])
    other = tmp_path / "other.h5"
    embedstore.embed(images, other, shard=(0, 4), **TINY)
    with pytest.raises(ShardError, match="expect"):
        merge(store, [dist.shard_file(other, 0, 4)], expect=4)
    assert issubclass(ShardError, EmbedstoreError) and issubclass(ShardError, ValueError)
    assert not store.exists() and not dist.shards_dir(store).exists()  # refused before anything was written


def test_skipped_shard_summary_has_the_keys_of_a_run(tmp_path: Path, images: Path):
    store = tmp_path / "s.h5"
    ran = embedstore.embed(images, store, shard=(0, 4), **TINY)
    skipped = embedstore.embed(images, store, shard=(0, 4), **TINY)
    assert skipped["shard_skipped"] and not ran["shard_skipped"]
    assert list(skipped) == list(ran)
    assert skipped["skipped"] == skipped["images"] == ran["images"] == ran["embedded"] + ran["failed"]


def test_ivf_on_disk_without_manifest_is_a_clear_error(tmp_path: Path):
    from embedstore.errors import IndexFileError

    rng = np.random.default_rng(1)
    _write_shard(tmp_path / "a.h5", rng.normal(size=(300, 8)), 0)
    out = tmp_path / "ivf"
    build_ivf_on_disk([tmp_path / "a.h5"], out, nlist=4)
    assert not list(out.glob(".*.tmp-*"))  # atomic writes leave no temporary files
    (out / "manifest.json").unlink()  # as after a build killed before its last step
    with pytest.raises(IndexFileError, match="build_ivf_on_disk again"):
        search_ivf_on_disk(out, rng.normal(size=(2, 8)), k=3)


# --------------------------------------------------------------------------- on a local Ray cluster


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_equals_local_and_skips_finished_shards(tmp_path: Path, images: Path, reference: Path,
                                                            ray_cluster: Any):
    store = tmp_path / "ray.h5"
    embedstore.embed(images, store, shard=(1, 3), **TINY)  # finished earlier, e.g. by a killed run
    out = embedstore.embed(images, store, engine="ray", shards=3, cpus_per_worker=1, **TINY)
    assert (out["engine"], out["shards"], out["shards_skipped"], out["shards_run"]) == ("ray", 3, 1, 2)
    assert out["workers"] == 2 and out["merged_files"] == 3 and out["worker_restarts"] == 0
    assert out["images"] == 49 and out["failed"] + out["embedded"] + out["skipped"] == 49
    assert_same_store(reference, store)
    assert not dist.shards_dir(store).exists()


@pytest.mark.slow
def test_ray_worker_killed_mid_shard_loses_and_duplicates_nothing(tmp_path: Path, images: Path, reference: Path,
                                                                  ray_cluster: Any, monkeypatch: pytest.MonkeyPatch):
    store, flag = tmp_path / "killed.h5", tmp_path / "kill-flag"
    monkeypatch.setenv(ray_runner.KILL_ENV, f"0:{flag}:2")  # die on the first attempt of shard 0, 2 parts in
    out = embedstore.embed(images, store, engine="ray", shards=2, cpus_per_worker=2, **{**TINY, "batch_size": 2})
    killed = flag.read_text()
    assert killed.startswith("killed after"), f"the worker finished shard 0 before it could be killed ({killed})"
    parts_before_kill = int(killed.split()[2])
    assert out["worker_restarts"] == 1 and out["shards_run"] == 2
    assert out["unchanged"] >= 2 * parts_before_kill  # the retry resumed: published parts were not redone
    assert_same_store(reference, store)
