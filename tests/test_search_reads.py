"""Search reads what a query touches: results equal brute force on synthetic stores written with
``StoreWriter.commit_arrays`` (rows, paths, vectors, filters, exclude-self), spaces whose rows are
not in store order, stale indexes after the store grows, and imported spaces without a backbone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedstore.errors import QueryError
from embedstore.index import build_index
from embedstore.search import search
from embedstore.store import StoreWriter, open_store
from embedstore_cli.main import main

DIM = 24


def attrs(**more: object) -> dict:
    return {"dim": DIM, "dtype": "float16", "backbone": "synthetic", "weights_sha256": None, **more}


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float16)


def write(store: Path, space: str, vecs: np.ndarray, paths: list[str], **columns: object) -> None:
    with StoreWriter(store, root=str(store.parent)) as w:
        w.commit_arrays(space, columns.pop("space_attrs", attrs()), vecs, paths, **columns)


def brute(st_path: Path, space: str | None, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
          drop: list[set[int]] | None = None) -> list[list[int]]:
    """Expected hit rows: cosine against every stored vector, in numpy."""
    sp = open_store(st_path).space(space)
    base = np.asarray(sp.vectors[:], np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ base.T
    out = []
    for i, row in enumerate(sims):
        order = np.argsort(-row, kind="stable")
        rows = sp.rows[order]
        if allowed is not None:
            rows = rows[np.isin(order, allowed)]
        if drop:
            rows = rows[~np.isin(rows, list(drop[i]))]
        out.append(rows[:k].tolist())
    return out


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """600 images: space "a" holds all of them; space "b" holds 86, committed in reverse row
    order, so its positions are not sorted by store row."""
    store = tmp_path / "syn.h5"
    n = 600
    paths = [f"{'cats' if i % 2 else 'dogs'}/{i:04d}.png" for i in range(n)]
    write(store, "a", vectors(n, 1), paths, labels=[f"c{i % 3}" for i in range(n)],
          splits=["val" if i % 4 == 0 else "train" for i in range(n)])
    back = paths[::-7]
    write(store, "b", vectors(len(back), 2), back, labels=[f"c{int(p[5:9]) % 3}" for p in back],
          splits=["val" if int(p[5:9]) % 4 == 0 else "train" for p in back])
    return store


def hit_rows(result: dict) -> list[list[int]]:
    return [[h["row"] for h in hits] for hits in result["results"]]


@pytest.mark.parametrize("space", ["a", "b"])
def test_row_path_and_vector_queries_match_brute_force(synthetic: Path, space: str) -> None:
    st = open_store(synthetic)
    sp = st.space(space)
    if space == "b":
        assert not np.all(np.diff(sp.rows) > 0)  # the case positions_of exists for
    pick = np.array([3, 40, 60, 85])
    rows = sp.rows[pick].tolist()
    stored = np.asarray(sp.vectors[np.sort(pick)], np.float32)[np.argsort(np.argsort(pick))]
    want = brute(synthetic, space, stored, 7)
    by_row = search(synthetic, rows=rows, k=7, space=space)
    assert hit_rows(by_row) == want and by_row["exact"]
    paths = [str(p) for p in sp.column("path", pick)]
    assert [q["row"] for q in by_row["queries"]] == rows and [q["query"] for q in by_row["queries"]] == paths
    by_path = search(synthetic, paths=paths, k=7, space=space)
    assert hit_rows(by_path) == want
    by_abs = search(synthetic, paths=[str(synthetic.parent / p) for p in paths], k=7, space=space)
    assert hit_rows(by_abs) == want  # absolute paths inside the root are the stored ones
    by_vec = search(synthetic, vectors=stored, k=7, space=space)
    assert hit_rows(by_vec) == want
    hit = by_row["results"][0][1]
    at = int(sp.positions_of([hit["row"]])[0])
    assert (hit["path"], hit["label"]) == (str(sp.column("path", [at])[0]), str(sp.column("label", [at])[0]))
    again = search(synthetic, rows=[rows[1], rows[0], rows[1]], k=3, space=space)  # repeats, any order
    assert hit_rows(again) == [want[1][:3], want[0][:3], want[1][:3]]
    selfless = search(synthetic, rows=rows, k=7, space=space, exclude_self=True)
    assert hit_rows(selfless) == brute(synthetic, space, stored, 7, drop=[{r} for r in rows])

    build_index(synthetic, space=space, kind="flat")
    indexed = search(synthetic, rows=rows, k=7, space=space)
    assert hit_rows(indexed) == want and not indexed["exact"] and not indexed["notes"]


def test_filters_read_codes_and_path_prefixes(synthetic: Path) -> None:
    sp = open_store(synthetic).space("b")
    labels, splits, paths = (np.asarray(sp.column(c), dtype=str) for c in ("label", "split", "path"))
    q = np.asarray(sp.vectors[[0, 10]], np.float32)
    for where, keep in (({"label": "c1"}, labels == "c1"), ({"split": "val"}, splits == "val"),
                        ({"path": "cats/00"}, np.char.startswith(paths, "cats/00")),
                        ({"label": "c2", "split": "train"}, (labels == "c2") & (splits == "train"))):
        got = search(synthetic, vectors=q, k=9, space="b", where=where)
        assert hit_rows(got) == brute(synthetic, "b", q, 9, allowed=np.flatnonzero(keep)), where
        assert all(h["label"] == where.get("label", h["label"]) for hits in got["results"] for h in hits)
    with pytest.raises(QueryError, match=r"path=birds/.*0 stored paths start with 'birds/'"):
        search(synthetic, vectors=q, space="b", where={"path": "birds/"})
    with pytest.raises(QueryError, match=r"label=c9.*labels are c0, c1, c2"):
        search(synthetic, vectors=q, space="b", where={"label": "c9"})
    out = CliRunner().invoke(main, ["search", str(synthetic), "--space", "b", "--row", str(int(sp.rows[0])),
                                    "--where", "path=cats/", "--json"])
    assert out.exit_code == 0, out.output
    assert all(h["path"].startswith("cats/") for h in json.loads(out.stdout)["results"][0])


def test_a_stale_index_answers_with_the_rows_added_since_searched_exactly(synthetic: Path) -> None:
    build_index(synthetic, space="a", kind="flat")
    assert not search(synthetic, rows=[5], k=3, space="a")["notes"]
    new = vectors(40, 9)
    write(synthetic, "a", new, [f"new/{i}.png" for i in range(40)])  # the store grows
    st = open_store(synthetic)
    new_rows = st.rows_of(["new/0.png", "new/39.png"]).tolist()
    got = search(synthetic, rows=new_rows, k=4, space="a")
    assert got["index"] is not None and any("out of date" in n and "embedstore index" in n for n in got["notes"])
    assert [hits[0]["row"] for hits in got["results"]] == new_rows  # rows the old index never held
    assert hit_rows(got) == brute(synthetic, "a", np.asarray(new[[0, 39]], np.float32), 4)
    build_index(synthetic, space="a")
    fresh = search(synthetic, rows=new_rows, k=4, space="a")
    assert not fresh["exact"] and not fresh["notes"]


def test_cli_vector_queries(synthetic: Path, tmp_path: Path) -> None:
    q = np.asarray(open_store(synthetic).space("a").vectors[[4]], np.float32)
    np.save(tmp_path / "q.npy", q[0])
    out = CliRunner().invoke(main, ["search", str(synthetic), "--space", "a", "--vector", str(tmp_path / "q.npy"),
                                    "-k", "5", "--json"])
    assert out.exit_code == 0, out.output
    assert hit_rows(json.loads(out.stdout)) == brute(synthetic, "a", q, 5)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4)))
    bad = CliRunner().invoke(main, ["search", str(synthetic), "--vector", str(tmp_path / "bad.npy")])
    assert bad.exit_code == 2 and "shape (2, 3, 4)" in bad.output
    wrong = CliRunner().invoke(main, ["search", str(synthetic), "--vector", str(tmp_path / "q.npy"), "--row", "1"])
    assert wrong.exit_code == 2 and "one kind of query" in wrong.output


def test_image_query_on_an_imported_space_names_the_queries_it_takes(tmp_path: Path, collection: Path) -> None:
    store = tmp_path / "imported.h5"
    write(store, "clip", vectors(20, 3), [f"x/{i}.jpg" for i in range(20)],
          space_attrs=attrs(imported_from="/data/clip-retrieval/out", backbone="unknown"))
    image = str(next(collection.rglob("*.png")))
    with pytest.raises(QueryError, match=r"imported from /data/clip-retrieval/out.*--row.*--path.*vectors"):
        search(store, images=[image])
    out = CliRunner().invoke(main, ["search", str(store), "--query", image])
    assert out.exit_code == 1 and "Traceback" not in out.output and "--row" in out.output
    assert search(store, rows=[3], k=1)["results"][0][0]["row"] == 3  # stored vectors still answer


def test_reranking_reads_the_candidates_and_scores_them_exactly(synthetic: Path) -> None:
    """An index tuned with ``k_factor`` is searched through its candidates re-ranked from the stored
    vectors: with every row a candidate the result is the exact one, whatever the PQ codes say."""
    from embedstore.index import load_index, search_index
    from embedstore.index.tune import set_params

    build_index(synthetic, space="b", kind="IVF2,PQ4x4")
    st = open_store(synthetic)
    sp = st.space("b")
    loaded = load_index(st, "b")
    set_params(loaded.index, {"nprobe": 2})
    q = np.asarray(sp.vectors[[1, 30, 70]], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    loaded.info["params"] = {"nprobe": 2, "k_factor": len(sp)}
    scores, rows = search_index(loaded, sp, q, 6)
    assert rows.tolist() == brute(synthetic, "b", q, 6)
    base = np.asarray(sp.vectors[:], np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    exact = (q[:, None, :] * base[sp.positions_of(rows.reshape(-1)).reshape(rows.shape)]).sum(-1)
    assert np.allclose(scores, exact, atol=1e-5)
