"""Streaming heads: classify, saved-head prediction and the fine-tune probe read only the rows they use."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

import embedstore
from embedstore.errors import EmbedstoreError, HeadError, StoreError
from embedstore.finetuning.probe import linear_probe, split_rows
from embedstore.heads import classify, load_head, predict_store, write_predictions
from embedstore.heads.rows import common_positions, iter_vectors, labelled_rows, read_vectors
from embedstore.store import StoreWriter
from embedstore_cli.classify_commands import register

N, DIM, LABELLED = 20_000, 32, 1_000  # the fast tier's store; the slow test writes 200k x 64 with 2k labelled


def _attrs(backbone: str = "synthetic-a", dim: int = DIM) -> dict:
    return {"dim": dim, "dtype": "float16", "backbone": backbone, "weights_sha256": None}


def _write_store(store: Path, n: int, dim: int, n_labelled: int, seed: int = 0) -> dict:
    """n float16 vectors of which n_labelled are labelled (two gaussian classes, 80% train / 20% val),
    written with StoreWriter.commit_arrays in four parts; the unlabelled rows are noise."""
    rng = np.random.default_rng(seed)
    labelled = np.sort(rng.choice(n, n_labelled, replace=False))
    cls = rng.integers(0, 2, n_labelled)
    centers = np.stack([np.full(dim, 1.0), np.full(dim, -1.0)]) * 0.5
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors[labelled] = centers[cls] + rng.normal(size=(n_labelled, dim))
    labels = np.full(n, "", dtype=object)
    labels[labelled] = np.array(["cat", "dog"], dtype=object)[cls]
    splits = np.full(n, "", dtype=object)
    splits[labelled] = np.where(rng.random(n_labelled) < 0.8, "train", "val")
    paths = np.array([f"img/{i:06d}.jpg" for i in range(n)], dtype=object)
    with StoreWriter(store, root=str(store.parent)) as w:
        for a in range(0, n, n // 4):
            s = slice(a, a + n // 4)
            w.commit_arrays("a", _attrs(dim=dim), vectors[s].astype(np.float16), paths[s].tolist(),
                            labels=labels[s].tolist(), splits=splits[s].tolist())
    return {"labelled": labelled, "labels": labels[labelled], "splits": splits[labelled],
            "paths": paths[labelled], "vectors": vectors[labelled].astype(np.float16)}


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A store of N vectors, LABELLED of them labelled (see _write_store)."""
    store = tmp_path_factory.mktemp("big") / "big.h5"
    return store, _write_store(store, N, DIM, LABELLED)


def _check_classify(store: Path, facts: dict, n: int, dim: int, n_labelled: int) -> None:
    report = classify(str(store), models=["logreg", "centroid"])
    n_train = int((facts["splits"] == "train").sum())
    assert report.protocol == "split"
    assert report.evaluation == {"train": n_train, "eval_split": "val", "eval": n_labelled - n_train}
    assert report.evaluation["train"] + report.evaluation["eval"] == n_labelled  # rows used = labelled rows
    assert all(r["accuracy"] >= 0.97 for r in report.results), report.results
    X, y, sp = report._data["a"]
    train = facts["splits"] == "train"
    assert X.dtype == np.float32 and X.shape == (n_train, dim)
    np.testing.assert_array_equal(X, facts["vectors"][train].astype(np.float32))  # same rows, same order
    assert list(y) == list(facts["labels"][train]) and len(sp) == n
    cv = classify(str(store), models=["centroid"], protocol="cv", folds=3)
    assert cv.evaluation["eval"] == n_labelled and cv.results[0]["accuracy"] >= 0.97


def test_classify_reads_the_labelled_rows_of_a_large_store_and_separates_them(big: tuple[Path, dict]) -> None:
    _check_classify(*big, N, DIM, LABELLED)


@pytest.mark.slow
def test_classify_200k_vectors_of_which_2k_are_labelled(tmp_path: Path) -> None:
    facts = _write_store(tmp_path / "200k.h5", 200_000, 64, 2_000, seed=1)
    _check_classify(tmp_path / "200k.h5", facts, 200_000, 64, 2_000)


def test_cv_parameters_of_the_folds_are_summarised_deterministically() -> None:
    """The most frequent choice across folds; a tie goes to the first fold's (never a set's order)."""
    from embedstore.heads.compare import _mode

    assert _mode([{"C": 10.0}, {"C": 1.0}, {"C": 10.0}, {"C": 0.1}, {"C": 0.1}]) == {"C": 10.0}
    assert _mode([{"C": 0.1}, {"C": 10.0}, {"C": 10.0}, {"C": 0.1}]) == {"C": 0.1}
    assert _mode([{"k": 1}, {"k": 3}, {"k": 3}]) == {"k": 3}


class CountingVectors:
    """A real array that records how many rows each read returns (what a store's space would read)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.reads = array, []

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(len(out))
        return out


class Rows:
    """The least a space offers to the row readers: vectors, codes, rows."""

    def __init__(self, vectors, labels=None, splits=None, rows=None, name="t") -> None:
        self.vectors, self.name = vectors, name
        self._labels, self._splits = labels, splits
        self.rows = np.arange(len(vectors)) if rows is None else np.asarray(rows)

    def codes(self, name: str):
        values = np.asarray(self._labels if name == "label" else self._splits, dtype=str)
        names = sorted(set(values.tolist()) - {""})
        return np.array([names.index(v) if v else -1 for v in values], np.int32), names

    def positions_of(self, rows):
        where = {int(r): i for i, r in enumerate(self.rows)}
        return np.array([where.get(int(r), -1) for r in np.asarray(rows)], np.int64)


def test_labelled_rows_and_chunked_reads_touch_only_the_rows_asked(big: tuple[Path, dict]) -> None:
    store, facts = big
    sp = embedstore.open_store(store).space("a")
    lab = labelled_rows(sp)
    np.testing.assert_array_equal(lab.positions, sp.positions_of(embedstore.open_store(store).rows_of(facts["paths"])))
    assert list(lab.labels) == list(facts["labels"]) and list(lab.splits) == list(facts["splits"])

    rng = np.random.default_rng(1)
    data = rng.normal(size=(1000, 8)).astype(np.float16)
    counting = CountingVectors(data)
    wanted = rng.permutation(1000)[:250]
    wanted = np.concatenate([wanted, wanted[:5]])  # any order, repeats allowed
    got = read_vectors(Rows(counting), wanted, chunk=64)
    np.testing.assert_array_equal(got, data[wanted].astype(np.float32))
    assert sum(counting.reads) <= len(wanted) and max(counting.reads) <= 64  # never more than asked, per chunk
    unit = read_vectors(Rows(data), wanted[:10], normalize=True, dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0)
    counting.reads.clear()
    seen = np.concatenate([at for at, _ in iter_vectors(Rows(counting), None, chunk=300)])
    np.testing.assert_array_equal(seen, np.arange(1000))
    assert counting.reads == [300, 300, 300, 100]
    with pytest.raises(HeadError, match="outside space"):
        read_vectors(Rows(data), np.array([3, 1000]))


def test_spaces_compared_side_by_side_use_their_common_labelled_rows(tmp_path: Path) -> None:
    """Space b holds a permuted subset of a's images: both are scored on the images they share,
    each in its own position order, found through rows and positions_of."""
    rng = np.random.default_rng(2)
    n = 600
    y = rng.integers(0, 3, n)
    vecs = (np.eye(3, 16)[y] * 3 + rng.normal(size=(n, 16))).astype(np.float16)
    labels = np.where(rng.random(n) < 0.5, np.array(["x", "y", "z"])[y], "")
    splits = np.where(labels != "", np.where(rng.random(n) < 0.7, "train", "val"), "")
    paths = [f"p/{i:04d}" for i in range(n)]
    order = rng.permutation(n)[:450]
    store = tmp_path / "two.h5"
    attrs = {"dim": 16, "dtype": "float16", "backbone": "a", "weights_sha256": None}
    with StoreWriter(store, root=str(tmp_path)) as w:
        w.commit_arrays("a", attrs, vecs, paths, labels=labels.tolist(), splits=splits.tolist())
        w.commit_arrays("b", {**attrs, "backbone": "b"}, vecs[order], [paths[i] for i in order],
                        labels=labels[order].tolist(), splits=splits[order].tolist())
    st = embedstore.open_store(store)
    keep_a, keep_b = common_positions([st.space("a"), st.space("b")])
    assert np.array_equal(np.sort(st.space("a").rows[keep_a]), np.sort(st.space("b").rows[keep_b]))
    both = set(order.tolist())
    expected = sum(1 for i in range(n) if i in both and splits[i] == "train")
    report = classify(str(store), models=["centroid"])
    assert report.evaluation["train"] == expected
    (Xa, ya, _), (Xb, yb, _) = report._data["a"], report._data["b"]
    assert len(Xa) == len(Xb) == expected and sorted(ya) == sorted(yb)
    # the same images, whatever order each space stores them in
    assert sorted(map(bytes, Xa.astype(np.float16))) == sorted(map(bytes, Xb.astype(np.float16)))
    assert all(r["accuracy"] >= 0.9 for r in report.results)


def _cli() -> click.Group:
    @click.group()
    def group() -> None:
        pass

    register(group)
    return group


def test_saved_head_predicts_a_store_chunk_by_chunk_and_only_chosen_rows(big: tuple[Path, dict],
                                                                         tmp_path: Path) -> None:
    store, facts = big
    report = classify(str(store), models=["logreg"])
    folder = report.save_head(str(tmp_path / "head"))
    head = load_head(folder)
    sp = embedstore.open_store(store).space("a")
    some = np.sort(np.random.default_rng(3).choice(N, 3000, replace=False))
    whole = head.predict(np.asarray(sp.vectors[some]))
    np.testing.assert_array_equal(head.predict_space(sp, positions=some, chunk=999), whole)
    lab = labelled_rows(sp)
    picked = head.predict_space(sp, positions=lab.positions[::-1], chunk=300)  # any order
    assert np.mean(picked[::-1] == lab.labels) >= 0.97

    chunks = list(predict_store(folder, store, paths=list(facts["paths"][:700]), top_k=2, chunk=256))
    assert [len(c) for c in chunks] == [256, 256, 188]
    preds = [p for c in chunks for p in c]
    assert [p["path"] for p in preds] == list(facts["paths"][:700])
    assert np.mean([p["label"] == t for p, t in zip(preds, facts["labels"][:700])]) >= 0.97
    assert all(len(p["top"]) == 2 and p["top"][0]["label"] == p["label"] for p in preds)

    out = tmp_path / "preds.csv"
    n = write_predictions(out, predict_store(head, store, chunk=8192))
    assert n == N
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N and rows[0]["path"] == "img/000000.jpg" and rows[-1]["row"] == str(N - 1)
    by_path = {r["path"]: r["label"] for r in rows}
    assert np.mean([by_path[p] == t for p, t in zip(facts["paths"], facts["labels"])]) >= 0.97

    res = CliRunner().invoke(_cli(), ["predict", folder, "--store", str(store), "--path", str(facts["paths"][0]),
                                      "--path", str(facts["paths"][1]), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)["predictions"]
    assert [p["path"] for p in got] == list(facts["paths"][:2])
    res = CliRunner().invoke(_cli(), ["predict", folder, "--store", str(store), "--out", str(tmp_path / "cli.csv"),
                                      *(a for p in facts["paths"][:3] for a in ("--path", str(p)))])
    assert res.exit_code == 0 and "3 prediction(s) written" in res.output
    with open(tmp_path / "cli.csv", newline="") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == list(facts["paths"][:3])
    res = CliRunner().invoke(_cli(), ["predict", folder])
    assert res.exit_code == 2 and "--store" in res.output
    with pytest.raises(StoreError, match="no image 'nope.jpg'"):
        list(predict_store(folder, store, paths=["nope.jpg"]))
    with pytest.raises(HeadError, match="folder"):
        write_predictions(tmp_path, predict_store(folder, store, paths=list(facts["paths"][:1])))


def test_a_head_refuses_a_store_space_of_other_weights(big: tuple[Path, dict], tmp_path: Path) -> None:
    store, facts = big
    folder = classify(str(store), models=["centroid"]).save_head(str(tmp_path / "head"))
    other = tmp_path / "other.h5"
    with StoreWriter(other, root=str(tmp_path)) as w:
        w.commit_arrays("a", _attrs("another-backbone"), facts["vectors"][:50], list(facts["paths"][:50]))
    with pytest.raises(HeadError, match="another space"):
        next(predict_store(folder, other))
    with pytest.raises(HeadError, match="another space"):
        load_head(folder).predict_space(embedstore.open_store(other).space(), positions=np.arange(3))
    assert not (tmp_path / "out.csv").exists()
    with pytest.raises(EmbedstoreError):
        write_predictions(tmp_path / "out.csv", predict_store(folder, other))
    assert not (tmp_path / "out.csv").exists()  # nothing half-written


def test_finetune_split_and_probe_read_only_the_split(big: tuple[Path, dict]) -> None:
    store, facts = big
    st = embedstore.open_store(store)
    sp = st.space("a")
    classes, train, val, source = split_rows(st, sp, seed=0)
    assert classes == ["cat", "dog"] and source == "val"
    assert len(train) + len(val) == LABELLED
    assert [p for p, _, _ in train] == list(facts["paths"][facts["splits"] == "train"])
    assert all(s == "val" for _, _, s in val)
    probe = linear_probe(sp, train, val, {"cat": 0, "dog": 1}, seed=0)
    assert probe["weight"].shape == (2, DIM) and probe["val_accuracy"] >= 0.97


def test_finetune_split_without_val_holds_out_a_fifth_of_train_per_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n = 300
    labels = np.where(np.arange(n) % 3 == 0, "", np.where(np.arange(n) % 2 == 0, "a", "b"))
    splits = np.where(labels != "", "train", "")
    store = tmp_path / "noval.h5"
    with StoreWriter(store, root=str(tmp_path)) as w:
        w.commit_arrays("s", {**_attrs(), "dim": 8}, rng.normal(size=(n, 8)).astype(np.float16),
                        [f"q/{i:03d}" for i in range(n)], labels=labels.tolist(), splits=splits.tolist())
    st = embedstore.open_store(store)
    classes, train, val, source = split_rows(st, st.space("s"), seed=5)
    assert source.startswith("20% of train") and classes == ["a", "b"]
    assert len(train) + len(val) == int((labels != "").sum())
    for c in classes:
        total = int((labels == c).sum())
        assert sum(1 for _, lab, _ in val if lab == c) == total // 5
    assert not set(train.positions) & set(val.positions)
    assert list(train.positions) == sorted(train.positions)
    again = split_rows(st, st.space("s"), seed=5)[2]
    np.testing.assert_array_equal(again.positions, val.positions)  # seeded
