"""Index at scale (issue 17): staleness by store generation, streamed builds under a whole-process
memory budget, IVF-PQ re-ranked from the stored float16 vectors, memory-mapped loading."""
from __future__ import annotations

import json
from pathlib import Path

import click
import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.errors import IndexBuildError
from embedstore.index import (build_index, index_files, index_is_current, index_vectors, load_index, normalized,
                              recall_at_k, search_index)
from embedstore.index import choose
from embedstore.index.budget import MIN_CHUNK, plan_build, training_rows
from embedstore.store import StoreWriter, open_store
from embedstore_cli.search_commands import register
from test_index import clustered

DIM = 64
ATTRS = {"backbone": "synthetic", "weights_sha256": "e" * 64, "dim": DIM, "dtype": "float16"}


def commit(store: Path, vectors: np.ndarray, first: int) -> None:
    """Publish ``vectors`` as rows img/{first}.. of space ``syn`` with the store's writer."""
    with StoreWriter(store, root=str(store.parent)) as w:
        w.commit_arrays("syn", ATTRS, vectors.astype(np.float16),
                        [f"img/{i:06d}.png" for i in range(first, first + len(vectors))])


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(14_000, DIM, clusters=60, seed=11)


@pytest.fixture()
def pq_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``auto`` pick its at-scale IVF-PQ index from 10k rows on (instead of 100k)."""
    monkeypatch.setattr(choose, "PQ_MIN_ROWS", 10_000)


def room() -> int:
    """A --memory budget with 1 GiB free beside what this process holds already: the slow tier runs these
    after tests that leave the pytest process at ~4.4 GiB, over the default budget of 4 GiB."""
    import psutil

    return psutil.Process().memory_info().rss + (1 << 30)


def exact_top(queries: np.ndarray, base: np.ndarray, k: int = 10) -> np.ndarray:
    return faiss.knn(normalized(queries), normalized(base), k, metric=faiss.METRIC_INNER_PRODUCT)[1]


@pytest.mark.slow  # two IVF-PQ trainings and a tuning that reads candidates from the store: ~15 s
def test_auto_ivf_pq_reranked_from_the_store_reaches_its_recall(tmp_path: Path, data: np.ndarray,
                                                                  pq_auto: None) -> None:
    store = tmp_path / "s.h5"
    commit(store, data[:12_000], 0)
    info = build_index(store, memory=room())
    assert info["factory"] == "IVF128,PQ16x4fs" and info["rerank"] == "stored vectors"
    assert info["kind"] == "ivf-pq+rerank" and info["params"]["k_factor"] >= 16 and info["recall_at_10"] >= 0.9
    st = open_store(store)
    sp = st.space()
    loaded = load_index(st)  # memory-mapped
    assert index_is_current(st, sp, loaded) and loaded.k_factor == info["params"]["k_factor"]
    queries = data[12_000:12_300]  # never seen by the build or the tuner
    _, rows = search_index(loaded, sp, normalized(queries), 10)
    assert recall_at_k(rows, exact_top(queries.astype(np.float16), data[:12_000].astype(np.float16))) >= 0.9
    _, unranked = loaded.index.search(normalized(queries), 10)  # the codes alone are far coarser
    assert recall_at_k(unranked, exact_top(queries, data[:12_000])) < 0.9


@pytest.mark.parametrize("kind", ["ivf-flat", pytest.param("auto", marks=pytest.mark.slow)])
def test_grown_store_is_stale_and_only_fresh_rows_are_added(tmp_path: Path, data: np.ndarray, pq_auto: None,
                                                            kind: str) -> None:
    store = tmp_path / "s.h5"
    commit(store, data[:12_000], 0)
    first = build_index(store, kind=kind, memory=room())
    assert first["factory"] == {"auto": "IVF128,PQ16x4fs", "ivf-flat": "IVF128,Flat"}[kind]
    st = open_store(store)
    assert first["store_uuid"] == st.uuid and first["space_generation"] == st.space().generation
    commit(store, data[12_000:14_000], 12_000)  # 2000 new images
    commit(store, data[:1] * 0.5 + data[1:2], 0)  # the image of row 0 was edited and embedded again
    st = open_store(store)
    assert not index_is_current(st, st.space(), load_index(st))
    grown = build_index(store, kind=kind, memory=room())
    assert (grown["mode"], grown["added"], grown["removed"], grown["rows"]) == ("incremental", 2001, 1, 14_000)
    loaded = load_index(store)
    assert loaded.index.ntotal == 14_000 and sorted(np.asarray(loaded.rows).tolist()) == list(range(14_000))
    st = open_store(store)
    sp = st.space()
    assert index_is_current(st, sp, loaded) and np.array_equal(loaded.versions, sp.versions)
    _, rows = search_index(loaded, sp, normalized(sp.vectors, np.array([0, 13_000])), 1)
    assert rows[:, 0].tolist() == [0, 13_000]
    again = build_index(store, kind=kind, memory=room())
    assert again["mode"] == "unchanged" and again["added"] == 0


def test_old_sidecar_or_other_store_rebuilds_with_a_note(tmp_path: Path, data: np.ndarray) -> None:
    store = tmp_path / "s.h5"
    commit(store, data[:3000], 0)
    build_index(store, kind="ivf-flat")
    files = index_files(store, "syn")
    info = json.loads(files.sidecar.read_text())
    old = {k: v for k, v in info.items() if k not in ("store_uuid", "space_generation")}  # before generations
    files.sidecar.write_text(json.dumps(old))
    st = open_store(store)
    assert not index_is_current(st, st.space(), load_index(st))
    rebuilt = build_index(store, kind="ivf-flat")
    assert rebuilt["mode"] == "full" and any("before store generations" in n for n in rebuilt["notes"])
    files = index_files(store, "syn")
    files.sidecar.write_text(json.dumps({**json.loads(files.sidecar.read_text()), "store_uuid": "0" * 32}))
    other = build_index(store, kind="ivf-flat")
    assert other["mode"] == "full" and any("another store" in n for n in other["notes"])
    assert build_index(store, kind="ivf-flat")["mode"] == "unchanged"


def test_ivf_lists_are_memory_mapped_on_load(tmp_path: Path, data: np.ndarray) -> None:
    store = tmp_path / "s.h5"
    commit(store, data[:5000], 0)
    build_index(store, kind="ivf-flat")
    mapped, whole = load_index(store), load_index(store, mmap=False)
    lists = lambda x: faiss.downcast_InvertedLists(faiss.extract_index_ivf(x.index).invlists)  # noqa: E731
    assert isinstance(lists(mapped), faiss.OnDiskInvertedLists) and isinstance(lists(whole), faiss.ArrayInvertedLists)
    q = normalized(data[5000:5050])
    s1, r1 = mapped.index.search(q, 10)
    s2, r2 = whole.index.search(q, 10)
    assert np.array_equal(r1, r2) and np.allclose(s1, s2)


def test_auto_keeps_lists_memory_mapped_once_fast_scan_would_be_read_whole(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss maps array inverted lists but reads fast-scan blocks whole: above READ_WHOLE_MAX the
    automatic index is 8-bit OPQ+PQ in an array a search maps (10M x 512: 640 MiB of fast-scan codes)."""
    small, large = choose.choose_factory(1_000_000, 512, 8 << 30), choose.choose_factory(10_000_000, 512, 8 << 30)
    assert "x4fs" in small and "x4fs" not in large and large.endswith("np")
    monkeypatch.setattr(choose, "PQ_MIN_ROWS", 1_000)
    x = clustered(4_000, DIM, clusters=20, seed=3)
    monkeypatch.setattr(choose, "READ_WHOLE_MAX", 1 << 40)
    fast = choose.choose_factory(len(x), DIM)
    monkeypatch.setattr(choose, "READ_WHOLE_MAX", 1 << 10)  # a store too large to read its lists per search
    mapped = choose.choose_factory(len(x), DIM)
    assert "x4fs" in fast and "x4fs" not in mapped
    for factory, on_disk in ((fast, False), (mapped, True)):
        store = tmp_path / f"{on_disk}.h5"
        commit(store, x, 0)
        build_index(store, kind=factory)
        loaded = load_index(store)  # held: the lists belong to its index
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded.index).invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists) == on_disk, (factory, type(lists))


class ReadLog:
    """An (n, dim) array that records how many rows each read asks for (the store's vector API)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.shape, self.dtype, self.reads = x, x.shape, x.dtype, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):  # noqa: ANN001
        out = self.x[key]
        self.reads.append(len(out))
        return out


def test_builds_stream_a_sample_and_chunks_never_the_whole_array() -> None:
    x = clustered(100_000, 8, clusters=30, seed=3).astype(np.float16)
    log = ReadLog(x)
    built = index_vectors(log, kind="IVF64,Flat", n_queries=100)
    assert built.index.ntotal == len(x) and built.plan.train_rows < len(x)
    assert max(log.reads) <= max(built.plan.train_rows, built.plan.chunk_rows) < len(x)


def test_budget_shrinks_the_sample_then_refuses_with_the_numbers() -> None:
    factory, n = "IVF1024,PQ128x4fs", 1_000_000
    least, wanted = training_rows(factory, n, 512)
    roomy = plan_build(factory, n, 512, 2, memory=8 << 30, rss=200 << 20)
    assert roomy.train_rows == wanted == 65_536 and roomy.total <= 8 << 30
    tight = plan_build(factory, n, 512, 2, memory=roomy.total - roomy.train_bytes // 3, rss=200 << 20)
    assert least <= tight.train_rows < wanted and tight.total <= tight.budget
    with pytest.raises(IndexBuildError, match=r"--memory 250.0M is too small to index 1000000 vectors of dimension "
                                              r"512: the smallest build .* needs process 200.0M \+ index .*"
                                              r"Allow at least --memory"):
        plan_build(factory, n, 512, 2, memory=250 << 20, rss=200 << 20)
    assert MIN_CHUNK <= tight.chunk_rows


def test_too_small_memory_is_one_clear_cli_error(tmp_path: Path, data: np.ndarray) -> None:
    store = tmp_path / "s.h5"
    commit(store, data[:2000], 0)
    group = click.Group()
    register(group)
    out = CliRunner().invoke(group, ["index", str(store), "--memory", "20M"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --memory 20.0M is too small to index 2000 vectors")
    assert "needs process" in lines[0] and "Allow at least --memory" in lines[0]
    assert not index_files(store, "syn").sidecar.exists()
