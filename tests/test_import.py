"""`embedstore import` and `add_vectors`: vectors embedded elsewhere (clip-retrieval's output layout,
or arrays in hand) become a space whose lineage says so, streamed in chunks, resumable after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import embedstore
from embedstore.errors import ImportFormatError, StoreError
from embedstore.pipeline import add_vectors, import_vectors
from embedstore.store import list_parts
from embedstore_cli.main import main

DIM = 24
CLASSES = ("cat", "dog", "owl")


def write_part(folder: Path, i: int, vectors: np.ndarray, paths: list, labels: list | None = None,
               splits: list | None = None, row_group_size: int = 7, **extra: list) -> None:
    """One clip-retrieval part: img_emb/img_emb_<i>.npy and metadata/metadata_<i>.parquet."""
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    np.save(folder / "img_emb" / f"img_emb_{i}.npy", vectors)
    cols = {"image_path": pa.array(paths, pa.string()), "caption": pa.array([f"a photo {p}" for p in paths])}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.string())
    if splits is not None:
        cols["split"] = pa.array(splits, pa.string())
    cols.update({k: pa.array(v) for k, v in extra.items()})
    pq.write_table(pa.table(cols), folder / "metadata" / f"metadata_{i}.parquet", row_group_size=row_group_size)


def clustered(rng: np.random.Generator, labels: list, dtype: str) -> np.ndarray:
    """Vectors near one centre per class (a separable set), in ``dtype``."""
    centres = np.random.default_rng(99).normal(size=(len(CLASSES), DIM)) * 3
    idx = [CLASSES.index(x) if x in CLASSES else 0 for x in labels]
    return (centres[idx] + rng.normal(size=(len(labels), DIM))).astype(dtype)


def make_folder(folder: Path, numbers: tuple[int, ...] = (0, 2, 10), rows: tuple[int, ...] = (50, 40, 30),
                dtypes: tuple[str, ...] = ("float16", "float32", "float32"), bad_rows: bool = True) -> dict:
    """A clip-retrieval folder of parts ``numbers``; returns what it holds in import (numeric) order."""
    rng = np.random.default_rng(0)
    expect: dict[str, list] = {"paths": [], "vectors": [], "labels": [], "splits": []}
    for i, n, dt in zip(numbers, rows, dtypes):
        paths = [f"part{i}/img_{j:04d}.jpg" for j in range(n)]
        labels = [CLASSES[j % 3] if j % 5 else None for j in range(n)]  # every 5th: no label
        splits = ["train" if j % 4 else "val" for j in range(n)]
        vectors = clustered(rng, labels, dt)
        if bad_rows and i == numbers[0]:
            vectors[3] = np.nan
            vectors[4] = 0
        with_cols = i != numbers[-1]  # the last part has no label / split columns at all
        write_part(folder, i, vectors, paths, labels if with_cols else None, splits if with_cols else None)
        expect["paths"] += paths
        expect["vectors"].append(vectors)
        expect["labels"] += [x or "" for x in labels] if with_cols else [""] * n
        expect["splits"] += splits if with_cols else [""] * n
    return expect


def run_cli(*args: str) -> tuple[int, str]:
    """(exit status, stdout) of the real command; with ``--json`` stdout is the JSON alone (notes go to stderr)."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout if "--json" in args else res.output


def by_path(space: embedstore.Space) -> dict[str, np.ndarray]:
    return dict(zip(space.paths.tolist(), space.vectors[:]))


# ------------------------------------------------------------------ the happy path


def test_cli_imports_three_parts_in_numeric_order(tmp_path: Path) -> None:
    src = tmp_path / "clip_out"
    expect = make_folder(src)
    store = tmp_path / "s.h5"
    code, out = run_cli("import", store, src, "--space", "clip", "--chunk-rows", "16", "--json", "--quiet")
    assert code == 0, out
    summary = json.loads(out)
    assert {k: summary[k] for k in ("space", "parts", "rows", "imported", "skipped", "failures", "dim", "dtype")} == {
        "space": "clip", "parts": 3, "rows": 120, "imported": 118, "skipped": 0, "failures": 2, "dim": DIM,
        "dtype": "float16"}
    assert summary["source"] == str(src.resolve()) and summary["seconds"] >= 0

    st = embedstore.open_store(store)
    sp = st.space("clip")
    assert sp.attrs["backbone"] == "imported" and sp.attrs["source_format"] == "clip-retrieval"
    assert sp.attrs["imported_from"] == str(src.resolve()) and sp.attrs["dim"] == DIM
    assert sp.attrs["dtype"] == "float16" and sp.attrs.get("weights_sha256") is None
    assert st.root == str(src.resolve())
    good = [j for j in range(120) if j not in (3, 4)]  # part 0 rows 3 (NaN) and 4 (zeros) are failures
    paths = [expect["paths"][j] for j in good]
    assert st.images["path"].tolist() == paths  # part 0, then 2, then 10: numeric, not name, order
    assert sorted((f["path"], f["space"], f["error"]) for f in st.failures) == [
        ("part0/img_0003.jpg", "clip", "BadVector"), ("part0/img_0004.jpg", "clip", "BadVector")]
    source = np.concatenate([v.astype(np.float16) for v in expect["vectors"]])
    stored = by_path(sp)
    assert sp.vectors.dtype == np.float16 and len(sp) == 118
    for j in good:
        assert stored[expect["paths"][j]].tobytes() == source[j].tobytes()
    pos = sp.positions_of(st.rows_of(paths))
    assert sp.column("label", pos).tolist() == [expect["labels"][j] for j in good]
    assert sp.column("split", pos).tolist() == [expect["splits"][j] for j in good]
    assert not list_parts(store)


def test_float32_store_keeps_the_source_bits(tmp_path: Path) -> None:
    src = tmp_path / "clip_out"
    expect = make_folder(src, bad_rows=False)
    store = tmp_path / "s.h5"
    summary = import_vectors(store, src, space="clip32", dtype="float32", chunk_rows=1000)
    assert summary["imported"] == 120 and summary["failures"] == 0 and summary["dtype"] == "float32"
    sp = embedstore.open_store(store).space("clip32")
    assert sp.vectors.dtype == np.float32
    source = np.concatenate([v.astype(np.float32) for v in expect["vectors"]])  # float16 part: exact upcast
    stored = by_path(sp)
    assert all(stored[p].tobytes() == source[j].tobytes() for j, p in enumerate(expect["paths"]))


def test_root_option_shares_rows_with_an_embedded_space(tmp_path: Path, tiny_store: Path) -> None:
    """Paths relative to --root (the collection an embed read) land on the embedded images' rows."""
    st = embedstore.open_store(tiny_store)
    frozen = st.space()
    paths = frozen.paths.tolist()
    src = tmp_path / "elsewhere"
    half = len(paths) // 2
    write_part(src, 0, np.random.default_rng(1).normal(size=(half, 8)).astype(np.float32), paths[:half])
    relabel = [None if j % 2 else "renamed" for j in range(len(paths) - half)]  # null: keep the stored label
    write_part(src, 1, np.random.default_rng(2).normal(size=(len(paths) - half, 8)).astype(np.float32),
               paths[half:], labels=relabel)
    code, out = run_cli("import", tiny_store, src, "--space", "other", "--root", st.root, "--quiet")
    assert code == 0 and out.splitlines() == [
        f"{tiny_store}: space other (8-d float16) from {src.resolve()}: {len(paths)} imported, 0 skipped, 0 failed "
        f"of {len(paths)} rows in 2 part(s) in " + out.split(" in ")[-1].strip()]
    after = embedstore.open_store(tiny_store)
    assert after.n_images == st.n_images  # no new image rows: the same files
    assert sorted(after.space("other").rows.tolist()) == sorted(frozen.rows.tolist())
    kept = after.space(frozen.name)  # the embedded space is untouched: same vectors, labels, file records
    assert kept.attrs["backbone"] == frozen.attrs["backbone"] != "imported"
    assert kept.rows.tolist() == frozen.rows.tolist() and kept.vectors[:].tobytes() == frozen.vectors[:].tobytes()
    for c in ("split", "size", "hash", "mtime"):
        assert kept.column(c).tolist() == frozen.column(c).tolist(), c
    labels = frozen.column("label").tolist()
    expected = labels[:half] + [x or labels[half + j] for j, x in enumerate(relabel)]
    assert kept.column("label").tolist() == expected  # labels are the images': a given one wins, a null keeps
    imported = after.space("other")
    assert imported.column("label", imported.positions_of(frozen.rows)).tolist() == expected


# ------------------------------------------------------------------ resume


def test_rerun_after_a_partial_import_adds_only_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "clip_out"
    full = tmp_path / "full"
    make_folder(full)
    make_folder(src, numbers=(0, 2), rows=(50, 40), dtypes=("float16", "float32"))  # the first two parts so far
    store = tmp_path / "s.h5"
    first = import_vectors(store, src, space="clip", chunk_rows=16)
    assert (first["imported"], first["failures"]) == (88, 2)
    before = by_path(embedstore.open_store(store).space("clip"))
    for sub in ("img_emb/img_emb_10.npy", "metadata/metadata_10.parquet"):  # the last part arrives
        os.replace(full / sub, src / sub)
    second = import_vectors(store, src, space="clip", chunk_rows=16)
    assert (second["imported"], second["skipped"], second["failures"]) == (30, 88, 2)  # failures are retried
    st = embedstore.open_store(store)
    sp = st.space("clip")
    assert len(sp) == 118 and st.n_images == 118 and len(st.failures) == 2
    now = by_path(sp)
    assert all(now[p].tobytes() == v.tobytes() for p, v in before.items())
    again = import_vectors(store, src, space="clip")
    assert (again["imported"], again["skipped"]) == (0, 118)


KILLER = """
import os, signal, sys
from embedstore.store import StoreWriter
from embedstore.pipeline import import_vectors
real, done = StoreWriter.commit_arrays, []
def commit_then_die(self, *a, **k):
    real(self, *a, **k)
    done.append(1)
    if len(done) == 3:  # killed right after the third durable chunk
        os.kill(os.getpid(), signal.SIGKILL)
StoreWriter.commit_arrays = commit_then_die
import_vectors(sys.argv[1], sys.argv[2], space="clip", chunk_rows=16)
"""


def test_sigkill_mid_import_loses_nothing_and_a_rerun_completes_it(tmp_path: Path) -> None:
    src = tmp_path / "clip_out"
    expect = make_folder(src, bad_rows=False)
    store = tmp_path / "s.h5"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(store), str(src)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = embedstore.open_store(store)  # readable right after the kill: the committed chunks
    done_before = by_path(partial.space("clip"))
    assert len(done_before) == 48 and len(list_parts(store)) == 3

    code, out = run_cli("import", store, src, "--space", "clip", "--chunk-rows", "16", "--json", "--quiet")
    assert code == 0, out
    summary = json.loads(out)
    assert (summary["imported"], summary["skipped"]) == (72, 48)
    st = embedstore.open_store(store)
    sp = st.space("clip")
    assert len(sp) == 120 and st.n_images == 120 and len(set(sp.rows.tolist())) == 120 and not list_parts(store)
    source = np.concatenate([v.astype(np.float16) for v in expect["vectors"]])
    now = by_path(sp)
    assert all(now[p].tobytes() == source[j].tobytes() for j, p in enumerate(expect["paths"]))
    assert all(now[p].tobytes() == v.tobytes() for p, v in done_before.items())


# ------------------------------------------------------------------ bad input: one Error: line, exit 1


def _rows_differ(src: Path) -> str:
    write_part(src, 0, np.ones((5, 4), np.float32), [f"{j}.jpg" for j in range(6)])
    return "metadata_0.parquet has 6 rows but"


def _dims_differ(src: Path) -> str:
    write_part(src, 0, np.ones((5, 4), np.float32), [f"a{j}.jpg" for j in range(5)])
    write_part(src, 1, np.ones((5, 6), np.float32), [f"b{j}.jpg" for j in range(5)])
    return "img_emb_1.npy has vectors of dim 6"


def _no_path_column(src: Path) -> str:
    write_part(src, 0, np.ones((3, 4), np.float32), ["a", "b", "c"])
    pq.write_table(pa.table({"url": ["a", "b", "c"]}), src / "metadata" / "metadata_0.parquet")
    return "metadata_0.parquet has no image_path column (it has: url)"


def _npy_alone(src: Path) -> str:
    write_part(src, 0, np.ones((3, 4), np.float32), ["a", "b", "c"])
    np.save(src / "img_emb" / "img_emb_1.npy", np.ones((3, 4), np.float32))
    return "img_emb_1.npy has no partner"


def _parquet_alone(src: Path) -> str:
    write_part(src, 3, np.ones((3, 4), np.float32), ["a", "b", "c"])
    (src / "img_emb" / "img_emb_3.npy").unlink()
    return "metadata_3.parquet has no partner"


def _one_dimensional(src: Path) -> str:
    write_part(src, 0, np.ones(3, np.float32), ["a", "b", "c"])
    return "img_emb_0.npy holds float32 of shape (3,), not vectors"


def _integers(src: Path) -> str:
    write_part(src, 0, np.ones((3, 4), np.int64), ["a", "b", "c"])
    return "img_emb_0.npy holds int64 of shape (3, 4), not vectors"


def _garbage_npy(src: Path) -> str:
    write_part(src, 0, np.ones((3, 4), np.float32), ["a", "b", "c"])
    (src / "img_emb" / "img_emb_0.npy").write_bytes(b"not an array at all")
    return "img_emb_0.npy cannot be read as a .npy array"


def _truncated_npy(src: Path) -> str:
    write_part(src, 0, np.ones((30, 4), np.float32), [str(j) for j in range(30)])
    npy = src / "img_emb" / "img_emb_0.npy"
    npy.write_bytes(npy.read_bytes()[:-50])
    return "img_emb_0.npy cannot be read as a .npy array"


def _garbage_parquet(src: Path) -> str:
    write_part(src, 0, np.ones((3, 4), np.float32), ["a", "b", "c"])
    (src / "metadata" / "metadata_0.parquet").write_bytes(b"PAR1 nonsense")
    return "metadata_0.parquet cannot be read as a parquet file"


def _no_img_emb(src: Path) -> str:
    (src / "metadata").mkdir(parents=True)
    return "img_emb is missing"


def _no_metadata(src: Path) -> str:
    (src / "img_emb").mkdir(parents=True)
    np.save(src / "img_emb" / "img_emb_0.npy", np.ones((3, 4), np.float32))
    return "metadata is missing"


def _no_parts(src: Path) -> str:
    (src / "img_emb").mkdir(parents=True)
    (src / "metadata").mkdir(parents=True)
    return "has no parts"


def _no_folder(src: Path) -> str:
    return f"no folder {src}"


def _null_path(src: Path) -> str:
    write_part(src, 0, np.ones((3, 4), np.float32), ["a", None, "c"])
    return "image_path is null in row 1"


BAD = [_rows_differ, _dims_differ, _no_path_column, _npy_alone, _parquet_alone, _one_dimensional, _integers,
       _garbage_npy, _truncated_npy, _garbage_parquet, _no_img_emb, _no_metadata, _no_parts, _no_folder, _null_path]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input_is_one_error_line(tmp_path: Path, make) -> None:
    src = tmp_path / "clip_out"
    expected = make(src)
    store = tmp_path / "s.h5"
    code, out = run_cli("import", store, src, "--space", "clip", "--quiet")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    assert expected in lines[0], lines[0]
    assert not store.exists() and not list_parts(store)  # refused before anything was written


def test_a_fault_found_while_streaming_keeps_the_chunks_before_it(tmp_path: Path) -> None:
    src = tmp_path / "clip_out"
    expect = make_folder(src, bad_rows=False)
    meta = src / "metadata" / "metadata_2.parquet"  # the second part: rows 50..89
    table = pq.read_table(meta)
    broken = table.set_column(0, "image_path", pa.array([None if j == 20 else p for j, p in
                                                         enumerate(table.column("image_path").to_pylist())]))
    pq.write_table(broken, meta)
    store = tmp_path / "s.h5"
    code, out = run_cli("import", store, src, "--space", "clip", "--chunk-rows", "16", "--quiet")
    assert code == 1 and out.splitlines() == [
        f"Error: {meta}: image_path is null in row 20: give every vector its image path (or drop that row from "
        "both files of the part)"]
    assert len(embedstore.open_store(store).space("clip")) == 50 + 16  # part 0, and part 2's first chunk
    pq.write_table(table, meta)  # the part is repaired: the rerun adds the rest
    code, out = run_cli("import", store, src, "--space", "clip", "--chunk-rows", "16", "--quiet", "--json")
    assert code == 0 and (json.loads(out)["imported"], json.loads(out)["skipped"]) == (120 - 66, 66)
    assert sorted(embedstore.open_store(store).space("clip").paths.tolist()) == sorted(expect["paths"])


def test_a_space_of_other_lineage_is_refused(tmp_path: Path, tiny_store: Path) -> None:
    src = tmp_path / "clip_out"
    make_folder(src, numbers=(0,), rows=(10,), dtypes=("float32",))
    frozen = embedstore.open_store(tiny_store).space().name
    code, out = run_cli("import", tiny_store, src, "--space", frozen, "--quiet")
    assert code == 1 and out.splitlines() == [
        f"Error: space {frozen!r} holds backbone={embedstore.open_store(tiny_store).space().attrs['backbone']!r} "
        "but this run has backbone='imported': choose another space name with --space NAME"]

    store = tmp_path / "s.h5"
    import_vectors(store, src, space="clip")
    other = tmp_path / "other_out"
    make_folder(other, numbers=(0,), rows=(10,), dtypes=("float32",))
    code, out = run_cli("import", store, other, "--space", "clip", "--quiet")
    assert code == 1 and len(out.splitlines()) == 1
    assert f"imported_from={str(other.resolve())!r}" in out and "choose another space name" in out


# ------------------------------------------------------------------ the imported space is usable


def test_search_and_classify_work_on_an_imported_space(tmp_path: Path) -> None:
    src = tmp_path / "clip_out"
    make_folder(src, numbers=(0, 1), rows=(60, 60), dtypes=("float16", "float32"), bad_rows=False)
    store = tmp_path / "s.h5"
    assert run_cli("import", store, src, "--space", "clip", "--quiet")[0] == 0

    code, out = run_cli("search", store, "--row", "0", "--space", "clip", "--json", "-k", "5")
    assert code == 0, out
    hits = json.loads(out)["results"][0]
    sp = embedstore.open_store(store).space("clip")
    v = sp.vectors[:].astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    pos0 = int(sp.positions_of([0])[0])
    expected = np.argsort(-(v @ v[pos0]), kind="stable")[:5]
    assert [h["row"] for h in hits][:1] == [0]
    assert sorted(h["row"] for h in hits) == sorted(sp.rows[expected].tolist())
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(v @ v[pos0])[::-1][:5], atol=1e-4)

    png = tmp_path / "query.png"
    Image.new("RGB", (32, 32), "red").save(png)
    code, out = run_cli("search", store, "--space", "clip", "-q", png)  # no model made these vectors
    assert code == 1 and len(out.splitlines()) == 1 and out.startswith("Error: space 'clip' holds vectors imported")

    code, out = run_cli("classify", store, "--space", "clip", "--models", "logreg,knn", "--no-confusion", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["protocol"] == "split"
    assert all(r["space"] == "clip" and r["accuracy"] >= 0.9 for r in report["results"])  # separable clusters


# ------------------------------------------------------------------ arrays in hand


def test_add_vectors_writes_arrays_with_their_lineage(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(10, 6)).astype(np.float32)
    paths = [f"/data/x{j}.jpg" for j in range(10)]
    store = tmp_path / "s.h5"
    labels = ["a", None, "b", "", "a", "b", "a", "b", "a", "b"]
    out = add_vectors(store, vectors, paths, space="arr", labels=labels, source="model-x.onnx", chunk_rows=4)
    assert (out["added"], out["replaced"], out["failures"], out["dtype"]) == (10, 0, 0, "float16")
    st = embedstore.open_store(store)
    sp = st.space("arr")
    assert sp.attrs["source_format"] == "arrays" and sp.attrs["imported_from"] == "model-x.onnx"
    assert sp.attrs["backbone"] == "imported" and st.root == os.getcwd()
    pos = sp.positions_of(st.rows_of(paths))
    assert sp.vectors[pos].tobytes() == vectors.astype(np.float16).tobytes()
    assert sp.column("label", pos).tolist() == [x or "" for x in labels]

    newer = vectors[:3] * 2  # a path the space has gets the new vector
    again = embedstore.add_vectors(store, newer, paths[:3], space="arr", source="model-x.onnx")
    assert (again["added"], again["replaced"]) == (3, 3)
    sp = embedstore.open_store(store).space("arr")
    assert len(sp) == 10 and sp.vectors[sp.positions_of(st.rows_of(paths[:3]))].tobytes() == \
        newer.astype(np.float16).tobytes()
    with pytest.raises(StoreError, match="imported_from='model-x.onnx'.*imported_from='other'"):
        add_vectors(store, vectors, paths, space="arr", source="other")
    plain = add_vectors(tmp_path / "t.h5", vectors, paths, space="arr", root="/data")
    assert embedstore.open_store(plain["store"]).space("arr").attrs["imported_from"] == plain["source"] == "add_vectors"
    with pytest.raises(ImportFormatError, match=r"shape \(10, 6\) for 9 path\(s\)"):
        add_vectors(store, vectors, paths[:9], space="arr2")
    with pytest.raises(ImportFormatError, match="dtype must be one of float16, float32, not 'int8'"):
        add_vectors(store, vectors, paths, space="arr2", dtype="int8")
