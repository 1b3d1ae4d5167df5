"""duplicates builds its k-NN graph in batches and keeps it: a second run (another threshold) reuses
it, a run whose batch files went missing resumes from the others, a change to the space starts a
new graph and removes only the old graph's own files. Synthetic stores with planted exact copies,
written with ``StoreWriter.commit_arrays``, so the groups are known."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.index import build_index
from embedstore.search import duplicates
from embedstore.store import StoreWriter, open_store
from embedstore_cli.main import main

DIM = 32
N = 3000
BATCH = 512  # six batches


def planted(n: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Random vectors with groups of exact copies at known positions (random pairs stay below 0.9)."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float16)
    groups = [[10, 2000], [5, 6, 7], [511, 512, 2999], [1024, 1500]]  # across batch edges too
    for g in groups:
        v[g[1:]] = v[g[0]]
    return v, groups


def write(store: Path, vectors: np.ndarray, start: int = 0) -> None:
    with StoreWriter(store, root=str(store.parent)) as w:
        w.commit_arrays("syn", {"dim": DIM, "dtype": "float16", "backbone": "synthetic", "weights_sha256": None},
                        vectors, [f"img/{i:05d}.png" for i in range(start, start + len(vectors))],
                        labels=[f"c{i % 3}" for i in range(start, start + len(vectors))])


def members(result: dict) -> list[list[int]]:
    return sorted(sorted(m["row"] for m in g["members"]) for g in result["groups"])


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, list[list[int]]]:
    path = tmp_path / "dups.h5"
    vectors, groups = planted(N, seed=3)
    write(path, vectors)
    st = open_store(path)
    return path, sorted(sorted(st.rows_of([f"img/{i:05d}.png" for i in g]).tolist()) for g in groups)


def batch_files(folder: str) -> list[Path]:
    return sorted(Path(folder).glob("[0-9]*.npy"))


def test_second_run_reuses_the_graph_and_a_cut_run_resumes(store: tuple[Path, list[list[int]]]) -> None:
    path, groups = store
    first = duplicates(path, threshold=0.999, batch=BATCH)
    assert members(first) == groups and first["exact"]
    cache = first["knn_cache"]
    assert (cache["batches"], cache["computed"], cache["reused"]) == (6, 6, 0) and "knn_graph" in first["stages"]
    assert len(batch_files(cache["folder"])) == 6
    assert members(duplicates(path, threshold=0.999, batch=BATCH, cache=False)) == groups

    again = duplicates(path, threshold=0.9999, batch=BATCH)  # another threshold: components only
    assert (again["knn_cache"]["computed"], again["knn_cache"]["reused"]) == (0, 6)
    assert "knn_graph" not in again["stages"] and "load_index" not in again["stages"]
    same = ("groups", "k", "images", "in_groups", "space", "exact")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    low = duplicates(path, threshold=0.0, batch=BATCH)  # far more edges, still from the same graph
    assert low["knn_cache"]["computed"] == 0 and low["in_groups"] > first["in_groups"]

    files = batch_files(cache["folder"])
    for f in (files[1], files[4]):  # a run killed before these were written
        f.unlink()
    (Path(cache["folder"]) / f".{files[2].name}.tmp-99999").write_bytes(b"half")  # a killed write
    files[3].write_bytes(files[3].read_bytes()[:200])  # damage that atomic writes rule out, still handled
    resumed = duplicates(path, threshold=0.999, batch=BATCH)
    assert (resumed["knn_cache"]["computed"], resumed["knn_cache"]["reused"]) == (3, 3)
    assert members(resumed) == groups and resumed["groups"] == first["groups"]
    assert duplicates(path, threshold=0.999, batch=BATCH)["knn_cache"]["computed"] == 0

    other_batches = duplicates(path, threshold=0.999, batch=1000)  # another layout: a graph of its own
    assert other_batches["knn_cache"]["computed"] == 3 and members(other_batches) == groups


def test_a_changed_space_starts_a_new_graph_and_removes_only_the_old_graphs_files(
        store: tuple[Path, list[list[int]]]) -> None:
    path, groups = store
    old = Path(duplicates(path, threshold=0.999, batch=BATCH)["knn_cache"]["folder"])
    other_k = Path(duplicates(path, threshold=0.999, k=4, batch=BATCH)["knn_cache"]["folder"])
    mine = old / "notes.txt"
    mine.write_text("not embedstore's")  # someone else's file in the old folder
    extra = np.random.default_rng(8).standard_normal((200, DIM)).astype(np.float16)
    extra[18] = extra[17]  # one more pair, among the new rows
    write(path, extra, start=N)
    grown = duplicates(path, threshold=0.999, batch=BATCH)
    new = Path(grown["knn_cache"]["folder"])
    assert new != old and grown["knn_cache"]["computed"] == 7 and grown["images"] == N + 200
    rows = open_store(path).rows_of([f"img/{N + 17:05d}.png", f"img/{N + 18:05d}.png"]).tolist()
    assert sorted(rows) in members(grown)
    assert old.is_dir() and [f.name for f in old.iterdir()] == ["notes.txt"]  # its graph gone, the rest kept
    assert not other_k.exists()  # another k of the old generation: removed whole
    assert duplicates(path, threshold=0.999, batch=BATCH)["knn_cache"]["computed"] == 0


def test_through_the_index_and_the_cli(store: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    path, groups = store
    runner = CliRunner()
    exact = duplicates(path, threshold=0.999, batch=BATCH)
    build_index(path, kind="hnsw")
    cold = runner.invoke(main, ["duplicates", str(path), "--threshold", "0.999", "--json"])
    assert cold.exit_code == 0, cold.output
    payload = json.loads(cold.stdout)
    assert {"groups", "threshold", "k", "images", "in_groups", "space", "exact", "notes", "stages"} <= set(payload)
    assert payload["exact"] is False and members(payload) == groups
    assert payload["knn_cache"]["computed"] == payload["knn_cache"]["batches"] and "knn_graph" in payload["stages"]
    warm = json.loads(runner.invoke(main, ["duplicates", str(path), "--threshold", "0.9995", "--json"]).stdout)
    assert warm["knn_cache"]["computed"] == 0 and "knn_graph" not in warm["stages"] and not warm["exact"]
    assert warm["groups"] == payload["groups"]
    assert exact["knn_cache"]["folder"] == payload["knn_cache"]["folder"]  # same space, same k: one place

    text = runner.invoke(main, ["duplicates", str(path), "--threshold", "0.999", "--no-cache"])
    assert text.exit_code == 0 and f"{len(groups)} groups of near-duplicates" in text.output
    assert "k-NN graph" not in text.stderr
    kept = runner.invoke(main, ["duplicates", str(path), "--threshold", "0.999"])
    assert f"0 computed, kept in {payload['knn_cache']['folder']}" in kept.stderr
    plain = json.loads(runner.invoke(main, ["duplicates", str(path), "--threshold", "0.999", "--no-cache",
                                            "--json"]).stdout)
    assert plain["knn_cache"]["folder"] is None and plain["knn_cache"]["computed"] == plain["knn_cache"]["batches"]
    assert plain["groups"] == payload["groups"]
