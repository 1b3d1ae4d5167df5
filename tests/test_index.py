"""FAISS indexes: choice, tuned recall, ids = store rows, sidecar, incremental add, broken files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedstore.index import (IndexFileError, build_index, choose_factory, exact_knn, index_files, index_vectors,
                              load_index, normalized, recall_at_k)
from embedstore.store import StoreWriter, open_store

DIM = 32


def clustered(n: int, dim: int = DIM, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Gaussian clusters, each spread along its own few directions (like image embeddings)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    bases = rng.standard_normal((clusters, 6, dim)) * 0.35
    lab = rng.integers(0, clusters, n)
    x = centers[lab] + np.einsum("nr,nrd->nd", rng.standard_normal((n, 6)), bases[lab])
    return (x + rng.standard_normal((n, dim)) * 0.1).astype(np.float32)


def write_store(path: Path, vectors: np.ndarray, labels: list[str] | None = None) -> Path:
    """Make the store at ``path`` hold ``vectors`` as space ``syn`` (row i = img/{i:05d}.png), written
    with the store's own writer: a new store in one commit, an existing one by committing only the
    rows that are new or whose vector changed (as ``embed`` would after images were added or edited)."""
    n = len(vectors)
    v16 = vectors.astype(np.float16)
    commit = np.arange(n)
    if path.exists():
        sp = open_store(path).space("syn")
        old = np.full((n, vectors.shape[1]), np.nan, np.float16)
        inside = sp.rows < n
        old[sp.rows[inside]] = sp.vectors[np.flatnonzero(inside)]
        commit = np.flatnonzero(~(old == v16).all(axis=1))
    labels = labels or [f"c{i % 3}" for i in range(n)]
    attrs = {"backbone": "synthetic", "weights_sha256": "f" * 64, "dim": vectors.shape[1], "dtype": "float16"}
    with StoreWriter(path, root=str(path.parent)) as w:
        w.commit_arrays("syn", attrs, v16[commit], [f"img/{i:05d}.png" for i in commit],
                        labels=[labels[i] for i in commit], splits=["train" if i % 4 else "val" for i in commit],
                        sizes=[1] * len(commit), hashes=[f"{i:032x}" for i in commit])
    return path


def true_neighbours(queries: np.ndarray, base: np.ndarray, k: int = 10) -> np.ndarray:
    q, b = normalized(queries), normalized(base)
    return np.argsort(-(q @ b.T), axis=1)[:, :k]


def test_choice_follows_size_and_memory() -> None:
    assert choose_factory(5_000, 512) == "Flat"
    assert choose_factory(50_000, 512) == "HNSW32"
    assert choose_factory(1_000_000, 512, 4 * 2**30) == "IVF1024,PQ128x4fs"  # re-ranked from the store
    assert choose_factory(50_000, 512, 20 * 2**20) == "IVF256,PQ128x4fs"  # HNSW's 100 MB do not fit
    assert choose_factory(1_000_000, 512, 50 * 2**20).startswith("OPQ32,")  # 64 bytes a vector do not fit
    with pytest.raises(ValueError, match="too small"):
        choose_factory(1_000_000, 512, 5 * 2**20)


@pytest.mark.parametrize("kind", ["hnsw", "ivf-flat", "ivf-pq-refine"])
def test_tuned_recall_holds_on_unseen_queries(kind: str) -> None:
    data = clustered(6000)
    base, queries = data[:5000], data[5000:5200]
    built = index_vectors(base, kind=kind, target_recall=0.95, n_queries=300)
    assert built.tuning.recall >= 0.95
    found = built.index.search(normalized(queries), 10)[1]
    assert recall_at_k(found, true_neighbours(queries, base)) >= 0.9  # queries never seen by the tuner
    assert built.latency_ms[0] > 0


def test_compressed_index_reports_its_real_recall() -> None:
    data = clustered(4000)
    built = index_vectors(data[:3800], kind="IVF32,PQ4x4", target_recall=0.99, n_queries=200)
    found = built.index.search(normalized(data[3800:]), 10)[1]
    measured = recall_at_k(found, true_neighbours(data[3800:], data[:3800]))
    assert built.tuning.recall < 0.99 and any("falls short of the target" in n for n in built.notes)
    assert abs(measured - built.tuning.recall) < 0.15


def test_ids_are_store_rows_and_sidecar_is_complete(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s.h5", clustered(3000))
    info = build_index(store, kind="ivf-flat")
    for key in ("kind", "params", "rows", "recall_at_10", "latency_p50_ms", "latency_p99_ms", "build_seconds", "bytes"):
        assert key in info
    assert info["rows"] == 3000 and info["kind"] == "ivf-flat" and info["params"]["nprobe"] >= 1
    assert json.loads(index_files(store, "syn").sidecar.read_text())["rows"] == 3000
    loaded = load_index(store)
    sp = open_store(store).space()
    scores, rows = loaded.index.search(normalized(sp.vectors, np.array([7, 2999])), 1)
    assert rows[:, 0].tolist() == [7, 2999] and np.allclose(scores[:, 0], 1, atol=1e-3)


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_incremental_add_equals_rebuild(tmp_path: Path, kind: str) -> None:
    data = clustered(3500, seed=1)
    store = write_store(tmp_path / "s.h5", data[:3000])
    assert build_index(store, kind=kind)["mode"] == "full"
    write_store(store, data)  # 500 images added: rows 3000..3499
    grown = build_index(store, kind=kind)
    assert (grown["mode"], grown["added"], grown["removed"], grown["rows"]) == ("incremental", 500, 0, 3500)
    queries = normalized(data[::50])
    inc = load_index(store)
    rebuilt_store = tmp_path / "copy.h5"
    shutil.copy(store, rebuilt_store)
    assert build_index(rebuilt_store, kind=kind, rebuild=True)["mode"] == "full"
    fresh = load_index(rebuilt_store)
    if kind == "ivf-flat":  # trained on other samples: compare with every list probed
        inc.index.nprobe = fresh.index.nprobe = inc.index.nlist
    s1, r1 = inc.index.search(queries, 10)
    s2, r2 = fresh.index.search(queries, 10)
    assert np.array_equal(r1, r2) and np.allclose(s1, s2, atol=1e-5)
    assert sorted(inc.rows.tolist()) == list(range(3500))


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_changed_vector_is_replaced(tmp_path: Path, kind: str) -> None:
    data = clustered(2000, seed=2)
    store = write_store(tmp_path / "s.h5", data)
    build_index(store, kind=kind)
    data[7] = clustered(1, seed=99)[0] * 3  # the image of row 7 changed and was embedded again
    write_store(store, data)
    info = build_index(store, kind=kind)
    if kind == "hnsw":  # HNSW cannot remove vectors: rebuilt, and says why
        assert info["mode"] == "full" and any("cannot remove" in n for n in info["notes"])
    else:
        assert (info["mode"], info["added"], info["removed"]) == ("incremental", 1, 1)
    loaded = load_index(store)
    scores, rows = loaded.index.search(normalized(data[7:8].astype(np.float16)), 2)
    assert rows[0, 0] == 7 and scores[0, 0] > 0.999 and loaded.index.ntotal == 2000


def test_unchanged_store_keeps_index_and_growth_can_change_layout(tmp_path: Path) -> None:
    data = clustered(12_000, seed=3)
    store = write_store(tmp_path / "s.h5", data[:3000])
    first = build_index(store, kind="ivf-flat")
    again = build_index(store, kind="ivf-flat")
    assert again["mode"] == "unchanged" and again["factory"] == first["factory"] == "IVF64,Flat"
    write_store(store, data)  # 4x the rows: twice the lists
    grown = build_index(store, kind="ivf-flat")
    assert grown["mode"] == "full" and grown["factory"] == "IVF128,Flat"
    assert any("rebuilt" in n for n in grown["notes"])


def test_broken_index_files_name_the_file_and_the_fix(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s.h5", clustered(500))
    with pytest.raises(IndexFileError, match=r"has no index .*embedstore index"):
        load_index(store)
    build_index(store)
    files = index_files(store, "syn")
    raw = files.index.read_bytes()
    files.index.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IndexFileError, match=rf"{files.index}.*corrupt.*rebuild it with `embedstore index {store}"):
        load_index(store)
    files.index.write_bytes(b"\0" * len(raw))  # right size, garbage inside
    with pytest.raises(IndexFileError, match=rf"{files.index} is corrupt"):
        load_index(store)
    files.index.unlink()
    with pytest.raises(IndexFileError, match=rf"{files.index} is missing.*embedstore index"):
        load_index(store)
    files.sidecar.write_text("{not json")
    with pytest.raises(IndexFileError, match=rf"sidecar {files.sidecar} is corrupt"):
        load_index(store)
    repaired = build_index(store)  # the fix the messages give works
    assert repaired["mode"] == "full" and load_index(store).index.ntotal == 500


def test_generations_switch_and_unversioned_files_are_adopted(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s.h5", clustered(500))
    build_index(store)
    first = index_files(store, "syn")
    assert first.generation == 1 and first.index.name == "syn.1.faiss"
    # the names of embedstore 0.1 (no generation): loaded as generation 0, replaced by the next build
    first.index.rename(first.index.with_name("syn.faiss"))
    first.rows.rename(first.rows.with_name("syn.rows.npy"))
    info = json.loads(first.sidecar.read_text())
    first.sidecar.write_text(json.dumps({k: v for k, v in info.items() if k != "generation"}))
    assert index_files(store, "syn").generation == 0 and load_index(store).index.ntotal == 500
    rebuilt = build_index(store, rebuild=True)
    assert rebuilt["generation"] == 1
    assert sorted(p.name for p in first.sidecar.parent.iterdir()) == ["syn.1.faiss", "syn.1.rows.npy", "syn.json",
                                                                      "syn.lock"]
    assert load_index(store).index.ntotal == 500


def test_exact_knn_streams_chunks_and_filters() -> None:
    data = clustered(70_000, dim=8, seed=4)  # more than two chunks
    ids = np.arange(len(data)) * 10
    q = normalized(data[:3])
    scores, found = exact_knn(q, data, ids, 5)
    assert found[:, 0].tolist() == [0, 10, 20] and np.all(np.diff(scores, axis=1) <= 0)
    positions = np.arange(1, len(data), 2)
    _, only_odd = exact_knn(q, data, ids, 5, positions)
    assert np.all((only_odd // 10) % 2 == 1)
