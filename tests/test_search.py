"""Search and duplicates over real (tiny) stores, and the index/search/duplicates commands."""
from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

import embedstore
from conftest import TINY_BACKBONE, make_collection
from embedstore.errors import BackboneError, IndexFileError
from embedstore.index import build_index, index_files, load_index
from embedstore.search import duplicates, parse_where, search
from embedstore.store import FAILURE_COLUMNS, open_store, write_file
from embedstore_cli.search_commands import register
from test_index import clustered, write_store

search_module = importlib.import_module("embedstore.search.query")  # the module that holds the constant


def images_of(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


@pytest.fixture
def cli() -> click.Group:
    @click.group()
    def group() -> None:
        """embedstore, as the tests wire it."""

    register(group)
    return group


@pytest.mark.parametrize("with_index", [True, False])
def test_each_image_finds_itself_first(tiny_store: Path, collection: Path, with_index: bool) -> None:
    if with_index:
        build_index(tiny_store)
    result = search(tiny_store, images=[str(collection)], k=3)
    assert len(result["results"]) == len(images_of(collection)) == 36
    for q, hits in zip(result["queries"], result["results"]):
        assert hits[0]["path"] == os.path.relpath(q["query"], collection.resolve())
        assert hits[0]["score"] > 0.999 and set(hits[0]) == {"path", "score", "row", "label", "split"}
    assert result["exact"] is not with_index
    assert any("no index" in n and "exact search" in n for n in result["notes"]) is not with_index


def test_rows_paths_and_filters(tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = open_store(tiny_store).space()
    assert search(tiny_store, rows=[int(sp.rows[4])], k=1)["results"][0][0]["row"] == sp.rows[4]
    assert search(tiny_store, paths=[str(sp.paths[9])], k=1)["results"][0][0]["path"] == sp.paths[9]
    build_index(tiny_store)
    red = search(tiny_store, rows=[0, 1], k=5, where={"label": "red_disc"})
    assert all(h["label"] == "red_disc" for hits in red["results"] for h in hits)
    val_rows = set(sp.rows[sp.splits == "val"].tolist())
    val = search(tiny_store, rows=[0], k=50, where={"split": "val"})["results"][0]
    assert {h["row"] for h in val} == val_rows  # k larger than the subset: all of it, nothing else
    monkeypatch.setattr(search_module, "FILTER_EXACT_MAX", 2)  # go through the index instead
    through_index = search(tiny_store, rows=[0, 1], k=5, where={"label": "red_disc"})
    assert through_index["results"] == red["results"] and not through_index["exact"]
    with pytest.raises(ValueError, match="label=NAME or split=NAME"):
        parse_where("colour=red")
    with pytest.raises(ValueError, match="row 999 is not in space"):
        search(tiny_store, rows=[999])
    with pytest.raises(ValueError, match="is not in"):
        search(tiny_store, paths=["nowhere.png"])


def test_mismatched_backbone_is_refused(tiny_store: Path, collection: Path, tmp_path: Path) -> None:
    st = open_store(tiny_store)
    sp = st.space()
    build_index(tiny_store)
    other = tmp_path / "other.h5"
    write_file(other, {"root": st.root}, st.images,
               {sp.name: ({**sp.attrs, "weights_sha256": "0" * 64}, sp.rows, sp.vectors)},
               {c: [] for c in FAILURE_COLUMNS})
    query = [str(images_of(collection)[0])]
    with pytest.raises(BackboneError, match="differ from the ones that built this space"):
        search(other, images=query, exact=True)
    shutil.copytree(str(tiny_store) + ".index", str(other) + ".index")
    with pytest.raises(IndexFileError, match="was built for other vectors"):
        search(other, rows=[0])


def test_incremental_index_after_embed_adds_only_new_rows(tiny_store: Path, collection: Path, tmp_path: Path) -> None:
    first = build_index(tiny_store)
    make_collection(collection / "more", per_class=2, splits=(), seed=7)
    embedstore.embed(collection, tiny_store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    grown = build_index(tiny_store)
    assert (first["rows"], grown["mode"], grown["added"], grown["rows"]) == (36, "incremental", 6, 42)
    new = [str(p) for p in images_of(collection / "more")]
    result = search(tiny_store, images=new, k=1)
    assert [h[0]["path"] for h in result["results"]] == [os.path.relpath(p, collection.resolve()) for p in new]
    assert not result["notes"]  # the index is up to date


def test_duplicates_are_connected_components_of_the_knn_graph(tmp_path: Path) -> None:
    data = clustered(3000, seed=5)
    data[2000] = data[10]  # an exact copy
    data[6] = data[5] * 1.001  # a chain: 5 ~ 6 ~ 7
    data[7] = data[6] + 1e-3
    store = write_store(tmp_path / "s.h5", data)
    expected = [[5, 6, 7], [10, 2000]]
    exact = duplicates(store, threshold=0.9999)
    assert exact["exact"] and [[m["row"] for m in g["members"]] for g in exact["groups"]] == expected
    build_index(store, kind="hnsw")
    indexed = duplicates(store, threshold=0.9999, cache=False)
    assert not indexed["exact"] and [[m["row"] for m in g["members"]] for g in indexed["groups"]] == expected
    assert indexed["in_groups"] == 5 and indexed["groups"][0]["min_score"] >= 0.9999
    kept = duplicates(store, threshold=0.9999)  # the exact graph of the first run is still the space's graph
    assert kept["exact"] and kept["knn_cache"]["computed"] == 0 and kept["groups"] == exact["groups"]


def test_cli_index_search_duplicates(tiny_store: Path, collection: Path, cli: click.Group, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    plain = runner.invoke(cli, ["search", str(tiny_store), "--row", "0", "-k", "2"])
    assert plain.exit_code == 0, plain.output
    assert "exact search" in plain.output and "rank" in plain.output  # the note goes to stderr

    done = runner.invoke(cli, ["index", str(tiny_store), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["kind"] == "flat"
    assert "up to date" in runner.invoke(cli, ["index", str(tiny_store)]).output

    out = runner.invoke(cli, ["search", str(tiny_store), "--row", "3", "--json"])
    payload = json.loads(out.stdout)
    assert len(payload["results"]) == 1 and payload["results"][0][0]["row"] == 3
    assert set(payload["results"][0][0]) == {"path", "score", "row", "label", "split"}

    a, b = (str(p) for p in images_of(collection)[:2])
    two = runner.invoke(cli, ["search", str(tiny_store), "--query", a, b, "-k", "1"])
    assert two.exit_code == 0 and two.output.count("query ") == 2

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    folder = runner.invoke(cli, ["search", str(tiny_store), "--query", str(collection / "val")])
    assert folder.exit_code == 0, folder.output
    written = Path(f"{tiny_store}.search") / "val.csv"  # beside the store, never in the current directory
    assert list(cwd.iterdir()) == [] and str(written) in folder.stderr
    with open(written) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 * 10 and rows[0]["rank"] == "1"
    elsewhere = runner.invoke(cli, ["search", str(tiny_store), "--query", str(collection / "val"),
                                    "--out", str(tmp_path / "mine.json")])
    assert elsewhere.exit_code == 0 and len(json.loads((tmp_path / "mine.json").read_text())["results"]) == 18
    assert list(cwd.iterdir()) == []

    assert runner.invoke(cli, ["search", str(tiny_store)]).exit_code == 2  # no query given

    dup = runner.invoke(cli, ["duplicates", str(tiny_store), "--threshold", "0.99999", "--json"])
    assert dup.exit_code == 0 and json.loads(dup.stdout)["images"] == 36

    files = index_files(tiny_store, open_store(tiny_store).space().name)
    files.index.write_bytes(files.index.read_bytes()[:100])
    broken = runner.invoke(cli, ["search", str(tiny_store), "--row", "0"])
    assert broken.exit_code == 1 and str(files.index) in broken.output
    assert f"embedstore index {tiny_store}" in broken.output and "Traceback" not in broken.output
    assert runner.invoke(cli, ["index", str(tiny_store)]).exit_code == 0  # the fix works
    assert load_index(tiny_store).index.ntotal == 36


def test_copied_image_is_a_duplicate(tiny_store: Path, collection: Path) -> None:
    src = images_of(collection)[0]
    shutil.copy(src, collection / "train" / "red_disc" / "copy_of_first.png")
    embedstore.embed(collection, tiny_store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    groups = duplicates(tiny_store, threshold=0.99999)["groups"]
    pair = {os.path.relpath(src, collection), "train/red_disc/copy_of_first.png"}
    assert any(pair <= {m["path"] for m in g["members"]} for g in groups)
    assert np.isclose(search(tiny_store, images=[str(src)], k=2)["results"][0][1]["score"], 1, atol=1e-4)
