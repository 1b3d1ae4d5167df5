"""Index and search API (issue 16): typed arguments (memory in bytes, where as a dict), every user
mistake an EmbedstoreError naming the value and the fix, the index split into one-concern modules."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.errors import EmbedstoreError, IndexBuildError, QueryError
from embedstore.index import KINDS, build_index, index_vectors, load_index, normalized, resolve_kind
from embedstore.index.checks import check_trainable
from embedstore.index.gpu import faiss_gpus, resolve_faiss_device
from embedstore.search import parse_where, search
from embedstore_cli.search_commands import register
from test_index import clustered, write_store


@pytest.fixture()
def cli() -> click.Group:
    group = click.Group()
    register(group)
    return group


@pytest.fixture()
def small_store(tmp_path: Path) -> Path:
    return write_store(tmp_path / "s.h5", clustered(400, 16, clusters=8))


def test_memory_is_bytes(small_store: Path) -> None:
    info = build_index(small_store, kind="flat", memory=3 << 30)  # the budget of the whole process
    assert info["memory"] == "3.0G" and "of --memory 3.0G" in info["memory_plan"]
    for bad in ("4G", 0, -1, 1.5, True):
        with pytest.raises(IndexBuildError, match=r"memory is a positive number of bytes.*parse_size"):
            build_index(small_store, kind="flat", memory=bad, rebuild=True)
    with pytest.raises(IndexBuildError, match="memory is a positive number of bytes"):
        index_vectors(clustered(100, 16), memory="1G")


def test_cli_parses_memory(small_store: Path, cli: click.Group) -> None:
    ok = CliRunner().invoke(cli, ["index", str(small_store), "--kind", "flat", "--memory", "3G", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["memory"] == "3.0G"
    bad = CliRunner().invoke(cli, ["index", str(small_store), "--memory", "lots"])
    assert bad.exit_code == 2 and "Invalid value for '--memory'" in bad.output
    assert "cannot read size 'lots'" in bad.output


def test_where_is_a_dict(small_store: Path, cli: click.Group) -> None:
    hits = search(small_store, rows=[0], k=5, where={"label": "c1", "split": "train"})["results"][0]
    assert hits and all(h["label"] == "c1" for h in hits)
    assert parse_where(["label=c1", " split = train "]) == {"label": "c1", "split": "train"}
    with pytest.raises(QueryError, match=r"where is a dict such as .*not 'label=c1'.*parse_where"):
        search(small_store, rows=[0], where="label=c1")
    with pytest.raises(QueryError, match=r"cannot filter on 'colour': where takes the keys label, split"):
        search(small_store, rows=[0], where={"colour": "red"})
    with pytest.raises(QueryError, match=r"where\['label'\] is a int"):
        search(small_store, rows=[0], where={"label": 1})
    out = CliRunner().invoke(cli, ["search", str(small_store), "--row", "0", "-k", "3", "--where", "label=c1",
                                   "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["where"] == {"label": "c1"}
    bad = CliRunner().invoke(cli, ["search", str(small_store), "--row", "0", "--where", "colour=red"])
    assert bad.exit_code == 1 and "Error: cannot read --where 'colour=red'" in bad.output


@pytest.mark.parametrize("call, message", [
    (lambda s: build_index(s, kind="IVF9999"), r"unknown index kind 'IVF9999'.*IVF256,SQ8"),
    (lambda s: build_index(s, kind="IVF512,Flat"),
     r"--kind IVF512,Flat cannot be trained on the 400 vectors.*IVF10,Flat"),
    (lambda s: build_index(s, target_recall=1.5), r"target recall must be in \(0, 1\], not 1.5"),
    (lambda s: build_index(s, device="tpu"), r"device must be auto, cpu or cuda, not 'tpu'"),
    (lambda s: build_index(s, kind="ivf-pq", memory=1000),
     r"--memory 1000 is too small to index 400 vectors of dimension 16: the smallest build .* needs process .*"
     r"Allow at least --memory"),
    (lambda s: index_vectors(np.ones((10, 16), np.float32), ids=[1, 2]), r"2 ids for 10 vectors"),
])
def test_build_mistakes_are_index_build_errors(small_store: Path, call, message: str) -> None:
    with pytest.raises(IndexBuildError, match=message) as e:
        call(small_store)
    assert isinstance(e.value, EmbedstoreError) and isinstance(e.value, ValueError)  # callers catching ValueError


def test_cuda_without_faiss_gpu_is_an_index_build_error() -> None:
    if faiss_gpus():
        assert resolve_faiss_device("cuda") == "cuda"
        return
    assert resolve_faiss_device("auto") == "cpu"
    with pytest.raises(IndexBuildError, match=r"--device cuda needs faiss's GPU build.*--device cpu"):
        resolve_faiss_device("cuda")


def test_search_mistakes_are_query_errors(small_store: Path) -> None:
    for kwargs, message in [({"rows": [0], "paths": ["img/00000.png"]}, "give exactly one kind of query"),
                            ({"rows": [10_000]}, "row 10000 is not in space 'syn'"),
                            ({"paths": ["elsewhere.png"]}, "elsewhere.png is not in"),
                            ({"vectors": np.ones((1, 3))}, r"query vectors have dimension 3, space 'syn' has 16")]:
        with pytest.raises(QueryError, match=message):
            search(small_store, **kwargs)


def test_cli_build_mistake_is_one_line(small_store: Path, cli: click.Group) -> None:
    out = CliRunner().invoke(cli, ["index", str(small_store), "--kind", "IVF512,Flat"])
    assert out.exit_code == 1 and out.output.startswith("Error: --kind IVF512,Flat cannot be trained")
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1


def test_vectors_are_unit_rows_and_index_round_trips(small_store: Path) -> None:
    x = np.array([[3, 4], [0, 0]], np.float16)
    assert np.allclose(normalized(x), [[0.6, 0.8], [0, 0]]) and normalized(x).dtype == np.float32
    assert normalized(x, slice(0, 0)).shape == (0, 2)
    info = build_index(small_store, kind="hnsw")
    assert info["kind"] == "hnsw" and tuple(KINDS)[0] == "auto"
    loaded = load_index(small_store)
    assert loaded.info["generation"] == info["generation"] and loaded.index.ntotal == 400
    assert not list((small_store.parent / "s.h5.index").glob(".*tmp-*"))  # atomic writes leave no temporaries
    assert resolve_kind("ivf-flat", 400, 16, 4 << 30) == "IVF10,Flat"
    with pytest.raises(IndexBuildError):
        check_trainable(__import__("faiss").index_factory(16, "IVF512,Flat"), "IVF512,Flat", "IVF512,Flat", 10)
