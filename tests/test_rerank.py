"""Re-ranking index candidates from the stored vectors (``embedstore.index.rerank``) equals a brute
force exact re-rank in numpy over the whole array, whether it reads the candidates' rows (a sparse
batch: a search) or every row once in order (a dense batch: duplicates), on a store written with
``StoreWriter.commit_arrays``; duplicates through a re-ranked index gives the same graph and groups
whether one search takes one batch or several, and a run that lost batch files resumes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedstore.index import build_index, choose, normalized
from embedstore.index import rerank as rr
from embedstore.search import duplicates
from embedstore.search.graph import graph_folder
from embedstore.store import StoreWriter, open_store

DIM = 256  # float16: 128 rows a vectors chunk
N = 4096  # 32 chunks


def commit(store: Path, space: str, vectors: np.ndarray, names: list[int]) -> None:
    with StoreWriter(store, root=str(store.parent)) as w:
        w.commit_arrays(space, {"dim": vectors.shape[1], "dtype": "float16", "backbone": "synthetic",
                                "weights_sha256": None}, vectors, [f"img/{i:05d}.png" for i in names])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Space "all" holds every image; space "part" every other one, committed in reverse order
    (positions not in row order), so half of the store's rows are absent from it."""
    path = tmp_path_factory.mktemp("rerank") / "s.h5"
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((N, DIM)).astype(np.float16)
    vectors[7] = vectors[3]  # exact copies: equal scores, which keep the candidates' order
    commit(path, "all", vectors, list(range(N)))
    names = list(range(N - 2, -1, -2))
    commit(path, "part", rng.standard_normal((len(names), DIM)).astype(np.float16), names)
    return path


def brute(sp, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact re-rank: every vector in memory, each query's candidates scored, a stable sort."""
    base = normalized(np.asarray(sp.vectors[:]))
    rows = sp.rows
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for i, (q, cand) in enumerate(zip(queries, candidates)):
        scores = np.full(len(cand), -np.inf, np.float32)
        for j, c in enumerate(cand):
            at = np.flatnonzero(rows == c)
            if c >= 0 and len(at):
                scores[j] = base[at[0]] @ q
        order = np.argsort(-scores, kind="stable")[:k]
        out_s[i, : len(order)] = scores[order]
        out_i[i, : len(order)] = np.where(np.isfinite(scores[order]), cand[order], -1)
    return out_s, out_i


def check(sp, queries: np.ndarray, candidates: np.ndarray, k: int, dense: bool) -> None:
    pos = sp.positions_of(candidates.reshape(-1)).reshape(candidates.shape)
    pos[candidates < 0] = -1
    assert rr.touches_densely(pos, len(sp), rr.chunk_rows(sp.vectors)) is dense  # the batch is what it says
    want_s, want_i = brute(sp, queries, candidates, k)
    got_s, got_i = rr.rerank(sp.vectors, sp.positions_of, queries, candidates, k)
    assert got_i.tolist() == want_i.tolist()
    assert np.array_equal(np.isinf(got_s), np.isinf(want_s))
    assert np.allclose(got_s[np.isfinite(got_s)], want_s[np.isfinite(want_s)], atol=1e-5)
    other = rr.rerank(sp.vectors, sp.positions_of, queries, candidates, k, dense=not dense)  # the other way
    assert np.array_equal(other[1], got_i) and np.array_equal(other[0], got_s)


def test_sparse_batch_equals_brute_force(store: Path) -> None:
    st = open_store(store)
    for name in ("all", "part"):
        sp = st.space(name)
        assert rr.chunk_rows(sp.vectors) == 128
        queries = normalized(sp.vectors, np.array([5, 40]))
        absent = 1 if name == "part" else N + 5  # an odd row is not in "part"; no row N + 5 anywhere
        candidates = np.array([[int(sp.rows[5]), -1, int(sp.rows[6]), absent, int(sp.rows[40])],
                               [-1, absent, int(sp.rows[41]), int(sp.rows[40]), -1]])
        check(sp, queries, candidates, 4, dense=False)
        check(sp, queries, candidates, 8, dense=False)  # fewer candidates than k: padded


def test_dense_batch_equals_brute_force(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = open_store(store)
    rng = np.random.default_rng(9)
    for name in ("all", "part"):
        sp = st.space(name)
        queries = normalized(sp.vectors, rng.choice(len(sp), 300, replace=False))
        candidates = rng.choice(np.concatenate([sp.rows, [-1, N + 5, 1]]), (300, 40))  # 1: not in "part"
        candidates[0, :4] = [3, 7, 7, 3] if name == "all" else candidates[0, :4]  # ties and repeats
        check(sp, queries, candidates, 10, dense=True)
        monkeypatch.setattr(rr, "RERANK_BYTES", 64 << 10)  # several passes of a few queries each
        assert rr.queries_per_pass(DIM, 40) < 300
        check(sp, queries, candidates, 10, dense=True)
        monkeypatch.undo()


@pytest.fixture
def reranked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store of 3000 vectors with planted copies, indexed by ``auto`` with codes re-ranked from
    the store (as from 100k rows on)."""
    path = tmp_path / "d.h5"
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((3000, 32)).astype(np.float16)
    for g in ([10, 2000], [5, 6, 7], [511, 512, 2999], [1024, 1500]):
        vectors[g[1:]] = vectors[g[0]]
    commit(path, "syn", vectors, list(range(3000)))
    monkeypatch.setattr(choose, "PQ_MIN_ROWS", 1000)
    info = build_index(path)
    assert info["rerank"] == "stored vectors" and info["params"]["k_factor"]
    return path


def graph(result: dict) -> list[np.ndarray]:
    return [np.load(f) for f in sorted(Path(result["knn_cache"]["folder"]).glob("[0-9]*.npy"))]


def test_duplicates_through_a_reranked_index_searches_several_batches_at_once(
        reranked: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from embedstore.index import load_index

    dup = importlib.import_module("embedstore.search.duplicates")  # the module (the package exports the function)
    searched: list[int] = []  # queries per search: the real search, counted

    def counted(loaded, sp, queries, k):  # noqa: ANN001, ANN202
        searched.append(len(queries))
        return rr.search_index(loaded, sp, queries, k)

    monkeypatch.setattr(dup, "search_index", counted)
    width = rr.rerank_width(load_index(reranked, "syn"), 11)  # k=10 and the row itself
    per_query = 4 * 32 + rr.CANDIDATE_BYTES * width
    runs, graphs = {}, {}
    for batches_per_search, searches in ((1, [512] * 5 + [440]), (4, [2048, 952]), (None, [3000])):
        st = open_store(reranked)
        for f in graph_folder(st, st.space(), 10).glob("[0-9]*.npy"):
            f.unlink()  # computed again
        if batches_per_search:
            monkeypatch.setattr(rr, "RERANK_BYTES", batches_per_search * 512 * per_query)
        else:
            monkeypatch.setattr(rr, "RERANK_BYTES", 1 << 28)  # as shipped: every batch in one search,
            monkeypatch.setattr(rr, "SEARCH_QUERIES", 700)  # its candidates found 700 queries at a time
        searched.clear()
        runs[batches_per_search] = result = duplicates(reranked, threshold=0.999, batch=512)
        assert searched == searches and result["knn_cache"]["computed"] == 6 and not result["exact"]
        graphs[batches_per_search] = graph(result)
        assert len(graphs[batches_per_search]) == 6  # every batch in its own file
    one = runs[1]
    assert len(one["groups"]) == 4 and runs[4]["groups"] == runs[None]["groups"] == one["groups"]
    for key in (4, None):
        for a, b in zip(graphs[key], graphs[1]):
            assert np.array_equal(a["row"], b["row"]) and np.allclose(a["score"], b["score"], atol=1e-6)

    files = sorted(Path(one["knn_cache"]["folder"]).glob("[0-9]*.npy"))
    before = graph(one)
    for f in (files[1], files[4]):  # a run killed before these were saved
        f.unlink()
    monkeypatch.setattr(rr, "RERANK_BYTES", 4 * 512 * per_query)
    searched.clear()
    resumed = duplicates(reranked, threshold=0.999, batch=512)
    assert searched == [1024]  # batches 1 and 4 in one search
    assert (resumed["knn_cache"]["computed"], resumed["knn_cache"]["reused"]) == (2, 4)
    assert resumed["groups"] == one["groups"]
    for a, b in zip(graph(resumed), before):
        assert np.array_equal(a["row"], b["row"])
