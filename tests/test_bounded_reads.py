"""Issue 17: commands read the rows they use. The fine-tune re-embedding lists the store a chunk of
rows at a time, the report reads string columns only for the rows it shows, the demo's query and
``predict --store``'s printed output never hold a whole column or every prediction at once; each
gives the same result as before on a real small store."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

import embedstore.heads
from embedstore.backbones import load_space_backbone
from embedstore.demo import nearest_neighbours
from embedstore.embedding.embedder import Embedder
from embedstore.finetuning.publish import reembed, store_items
from embedstore.heads import classify
from embedstore.report import write_report
from embedstore.store import Store, StoreWriter, open_store
from embedstore_cli.classify_commands import _echo_json_list, register

DIM = 16


@pytest.fixture
def column_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None]]:
    """Every ``Store.image_column`` call as (column, rows asked; None for the whole column): the real
    method still answers (``Store.images[...]`` goes through it too)."""
    calls: list[tuple[str, int | None]] = []
    real = Store.image_column

    def logged(self: Store, name: str, rows: object = None) -> np.ndarray:
        calls.append((name, None if rows is None else int(np.asarray(rows).size)))
        return real(self, name, rows)

    monkeypatch.setattr(Store, "image_column", logged)
    return calls


def labelled_store(path: Path, n: int, seed: int = 0) -> dict[str, list]:
    """n random float16 vectors of space "s", labels c0..c2, every fifth image in val; no image files."""
    rng = np.random.default_rng(seed)
    facts = {"paths": [f"img/{i:05d}.png" for i in range(n)], "labels": [f"c{i % 3}" for i in range(n)],
             "splits": ["val" if i % 5 == 0 else "train" for i in range(n)]}
    vectors = rng.standard_normal((n, DIM)).astype(np.float16)
    vectors[:, 0] += np.arange(n) % 3 * 3  # the classes are separable
    attrs = {"dim": DIM, "dtype": "float16", "backbone": "synthetic", "weights_sha256": None}
    with StoreWriter(path, root=str(path.parent)) as w:
        w.commit_arrays("s", attrs, vectors, facts["paths"], labels=facts["labels"], splits=facts["splits"])
    return facts


def test_finetune_reembedding_lists_the_store_a_chunk_of_rows_at_a_time(tiny_store: Path, collection: Path,
                                                                         column_reads: list) -> None:
    st = open_store(tiny_store)
    frozen = st.space()
    n = st.n_images
    whole = [(p, lab, s) for p, lab, s in zip(*(st.image_column(c) for c in ("path", "label", "split")))]
    column_reads.clear()
    items = [it for chunk in store_items(st, chunk=10) for it in chunk]
    assert [(it.rel, it.label, it.split) for it in items] == whole  # every image, in row order
    assert all(it.path == str(collection.resolve() / it.rel) for it in items)
    gone = items[7].rel
    (collection / gone).unlink()  # recorded as a failure of the new space

    bb = load_space_backbone(frozen.attrs)
    embedder = Embedder(bb, device="cpu", precision=frozen.attrs["precision"])
    attrs = {**bb.space_attrs(), "dtype": "float16", "precision": embedder.precision, "device": "cpu"}
    column_reads.clear()
    counts = reembed(st, tiny_store, "copy", embedder, attrs, batch_size=8, workers=0, progress=False, chunk=10)
    assert counts == {"embedded": n - 1, "failed": 1, "images": n}
    assert column_reads and all(rows is not None and rows <= 10 for _, rows in column_reads), column_reads

    after = open_store(tiny_store)
    copy = after.space("copy")
    assert sorted(copy.rows) == sorted(set(frozen.rows) - {int(st.rows_of([gone])[0])})
    pos = frozen.positions_of(copy.rows)
    np.testing.assert_allclose(np.asarray(copy.vectors[:], np.float32), np.asarray(frozen.vectors[pos], np.float32),
                               atol=2e-2)  # same weights, same images: the same vectors
    assert [(f["path"], f["space"]) for f in after.failures] == [(gone, "copy")]
    again = reembed(after, tiny_store, "copy", embedder, attrs, batch_size=8, workers=0, progress=False, chunk=10)
    assert again == {"embedded": 0, "failed": 1, "images": n}  # a rerun embeds nothing new


def test_report_reads_string_columns_only_for_the_rows_it_shows(tmp_path: Path, column_reads: list) -> None:
    store = tmp_path / "s.h5"
    facts = labelled_store(store, 3000)
    s = write_report(store, tmp_path / "r.html", max_points=40, queries=3, k=3, models=["centroid"], threshold=0.999)
    assert None not in {rows for _, rows in column_reads}, column_reads  # no whole column
    shown = {"path": 0, "hash": 0}
    for name, rows in column_reads:
        shown[name] = shown.get(name, 0) + rows
    assert shown["path"] <= 200 and shown["hash"] <= 100, shown  # map points, galleries, groups: not 3000
    assert s["classifiers"] is not None and s["sampled"]["s"]["map_points"] == 40
    text = (tmp_path / "r.html").read_text()
    thumbs = json.loads(re.search(r'<script type="application/json" id="thumbs">(.*?)</script>', text, re.S).group(1))
    assert len(thumbs) >= 40
    for row, (_, path, label) in thumbs.items():  # each thumbnail names its own row's path and label
        assert (path, label) == (facts["paths"][int(row)], facts["labels"][int(row)])
    for label, color in (("c0", "#1f77b4"), ("c1", "#ff7f0e"), ("c2", "#2ca02c")):  # the store's labels, sorted
        assert re.search(rf'background:{color}"></span>{label} \(\d+\)</li>', text), label  # the map's legend


def test_demo_query_reads_the_split_codes_and_one_path(tmp_path: Path, column_reads: list) -> None:
    store = tmp_path / "s.h5"
    facts = labelled_store(store, 400)
    out = nearest_neighbours(store, k=4)
    first_val = facts["splits"].index("val")
    assert out["query"] == facts["paths"][first_val] and len(out["hits"]) == 4
    assert all(h["row"] != first_val for h in out["hits"])
    # the filter reads codes; split strings are read once, for the hits (k + 1: the query left out) only
    assert [rows for name, rows in column_reads if name == "split"] == [5], column_reads
    assert all(rows is not None and rows <= 5 for _, rows in column_reads), column_reads  # the query, k + 1 hits


def test_predict_store_prints_chunk_by_chunk_what_it_printed_whole(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s.h5"
    labelled_store(store, 50)
    head = classify(str(store), models=["centroid"]).save_head(str(tmp_path / "head"))
    real = embedstore.heads.predict_store
    whole = [p for chunk in real(head, store) for p in chunk]
    printed: list[int] = []  # bytes of output already printed when each chunk is read

    def in_chunks_of_7(*args: object, **kwargs: object):  # noqa: ANN202 (8 chunks)
        for chunk in real(*args, **{**kwargs, "chunk": 7}):
            printed.append(len(sys.stdout.buffer.getvalue()))
            yield chunk

    monkeypatch.setattr(embedstore.heads, "predict_store", in_chunks_of_7)
    group = click.Group()
    register(group)
    res = CliRunner().invoke(group, ["predict", head, "--store", str(store), "--json"])
    assert res.exit_code == 0, res.output
    assert len(printed) == 8 and printed[0] == 0 and all(a < b for a, b in zip(printed[1:], printed[2:]))  # streamed
    h = embedstore.heads.load_head(head)
    expected = {"head": str(h.path), "store": str(store), "space": h.space, "model": h.model, "predictions": whole}
    assert res.output == json.dumps(expected, indent=2, default=str) + "\n"  # emit_json's text, byte for byte
    res = CliRunner().invoke(group, ["predict", head, "--store", str(store)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["image", "label", "p", "top", "3"] and set(lines[1]) <= {"-", " "}
    assert [ln.split()[0] for ln in lines[2:]] == [p["path"] for p in whole]
    assert [ln.split()[1] for ln in lines[2:]] == [p["label"] for p in whole]


def test_streamed_json_list_is_emit_json_text(capsys: pytest.CaptureFixture[str]) -> None:
    head = {"head": "h", "n": 1, "nested": {"a": [1, 2]}}
    for chunks in ([], [[]], [[{"a": 1, "b": ["x\ny", 2.5]}], [], [{"c": None}, {"d": {"e": []}}]]):
        _echo_json_list(head, "items", iter(chunks))
        whole = {**head, "items": [x for c in chunks for x in c]}
        assert capsys.readouterr().out == json.dumps(whole, indent=2) + "\n"
