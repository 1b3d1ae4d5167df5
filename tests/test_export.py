"""`embedstore export` / `export_vectors` and `Space.to_arrow` / `to_pandas`: a space written in the layout
clip-retrieval writes (img_emb/img_emb_<i>.npy + metadata/metadata_<i>.parquet), read back by
`embedstore import`, embedding-reader and autofaiss; parts appear whole, nothing is overwritten."""
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

import embedstore
from embedstore.errors import ExportError, StoreError
from embedstore.pipeline import add_vectors, export_vectors, import_vectors
from test_import import run_cli

DIM = 12
CLASSES = ("cat", "dog", "owl")


def make_store(folder: Path, n: int = 250, dtype: str = "float16", seed: int = 0) -> Path:
    """A store of ``n`` random vectors: labels with gaps (None), splits with gaps, two absolute paths."""
    rng = np.random.default_rng(seed)
    paths = [f"photos/{CLASSES[j % 3]}/img_{j:04d}.jpg" for j in range(n)]
    paths[5], paths[7] = "/elsewhere/a.jpg", "/elsewhere/b.jpg"
    labels = [CLASSES[j % 3] if j % 4 else None for j in range(n)]
    splits = [("train", "val", None)[j % 3] for j in range(n)]
    store = folder / f"s-{dtype}.h5"
    add_vectors(store, rng.normal(size=(n, DIM)).astype(np.float32), paths, space="emb", labels=labels,
                splits=splits, dtype=dtype, root=str(folder / "root"), source="test vectors")
    return store


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def visible_parts(out: Path) -> tuple[list[str], list[str]]:
    return (sorted(p.name for p in (out / "img_emb").glob("img_emb_*.npy")),
            sorted(p.name for p in (out / "metadata").glob("metadata_*.parquet")))


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_export_then_import_gives_the_same_space(tmp_path: Path, dtype: str) -> None:
    store = make_store(tmp_path, dtype=dtype)
    out = tmp_path / "out"
    summary = export_vectors(store, out, part_rows=70, chunk_rows=32)
    assert {k: summary[k] for k in ("space", "parts", "rows", "dim", "dtype", "part_rows")} == {
        "space": "emb", "parts": 4, "rows": 250, "dim": DIM, "dtype": dtype, "part_rows": 70}
    assert summary["bytes"] == sum(len(b) for n, b in listing(out).items() if not n.startswith("."))
    assert set(summary["seconds"]) == {"read", "write", "total"}

    src = embedstore.open_store(store)
    sp = src.space("emb")
    npys, parquets = visible_parts(out)
    assert npys == [f"img_emb_{i}.npy" for i in range(4)] and parquets == [f"metadata_{i}.parquet" for i in range(4)]
    for i, rows in enumerate((70, 70, 70, 40)):
        arr = np.load(out / "img_emb" / f"img_emb_{i}.npy")
        assert arr.dtype == np.dtype(dtype) and arr.shape == (rows, DIM)  # the stored dtype, no float32 copy
        assert arr.tobytes() == sp.vectors[70 * i:70 * i + rows].tobytes()
        meta = pq.read_table(out / "metadata" / f"metadata_{i}.parquet")
        assert meta.schema.names == ["image_path", "label", "split"]
        assert all(meta.schema.field(c).type == pa.string() for c in meta.schema.names)
        assert meta.column("image_path").to_pylist() == sp.column("path", slice(70 * i, 70 * i + rows)).tolist()
    manifest = json.loads((out / "embedstore.json").read_text())
    assert manifest["space"] == "emb" and manifest["root"] == str(tmp_path / "root") and manifest["rows"] == 250
    assert manifest["attrs"]["imported_from"] == "test vectors" and manifest["store_uuid"] == src.uuid

    back = tmp_path / "back.h5"
    imported = import_vectors(back, out, space="emb", dtype=dtype, chunk_rows=64)
    assert (imported["imported"], imported["failures"], imported["parts"]) == (250, 0, 4)
    st = embedstore.open_store(back)
    again = st.space("emb")
    assert st.root == src.root  # the root embedstore.json records: the same images resolve
    assert again.vectors.dtype == sp.vectors.dtype and again.vectors[:].tobytes() == sp.vectors[:].tobytes()
    for column in ("path", "label", "split"):
        assert again.column(column).tolist() == sp.column(column).tolist()
    assert sp.column("label").tolist()[:5] == ["", "dog", "owl", "cat", ""]  # gaps survive as gaps


def test_absolute_paths_option_writes_every_path_absolute(tmp_path: Path) -> None:
    store = make_store(tmp_path, n=20)
    out = tmp_path / "out"
    export_vectors(store, out, absolute_paths=True)
    got = pq.read_table(out / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()
    st = embedstore.open_store(store)
    assert got == [st.abspath(p) for p in st.space().paths.tolist()]
    assert got[0] == str(tmp_path / "root" / "photos/cat/img_0000.jpg") and got[5] == "/elsewhere/a.jpg"


def test_an_embedded_store_round_trips_with_images_that_resolve(tmp_path: Path, tiny_store: Path) -> None:
    out = tmp_path / "exported"
    code, text = run_cli("export", tiny_store, out, "--part-rows", "10", "--json", "--quiet")
    assert code == 0, text
    summary = json.loads(text)
    src = embedstore.open_store(tiny_store)
    sp = src.space()  # the default space, as search picks it
    assert summary["space"] == sp.name and summary["rows"] == len(sp) and summary["parts"] == -(-len(sp) // 10)
    code, text = run_cli("import", tmp_path / "copy.h5", out, "--space", "copy", "--dtype", str(sp.vectors.dtype),
                         "--quiet")
    assert code == 0, text
    st = embedstore.open_store(tmp_path / "copy.h5")
    copy = st.space("copy")
    assert copy.paths.tolist() == sp.paths.tolist() and copy.vectors[:].tobytes() == sp.vectors[:].tobytes()
    assert copy.labels.tolist() == sp.labels.tolist() and copy.splits.tolist() == sp.splits.tolist()
    assert all(os.path.isfile(st.abspath(p)) for p in copy.paths.tolist())


def test_part_numbers_are_zero_padded_so_name_order_is_row_order(tmp_path: Path) -> None:
    store = make_store(tmp_path, n=120)
    out = tmp_path / "out"
    export_vectors(store, out, part_rows=10)
    npys, parquets = visible_parts(out)
    assert npys == [f"img_emb_{i:02d}.npy" for i in range(12)]  # as clip-retrieval pads: 12 parts, 2 digits
    assert parquets == [f"metadata_{i:02d}.parquet" for i in range(12)]
    joined = np.concatenate([np.load(out / "img_emb" / n) for n in npys])  # in name order
    assert joined.tobytes() == embedstore.open_store(store).space().vectors[:].tobytes()


# ------------------------------------------------------------------ nothing overwritten


def test_a_folder_holding_an_export_is_refused_and_left_untouched(tmp_path: Path) -> None:
    store = make_store(tmp_path, n=30)
    out = tmp_path / "out"
    assert run_cli("export", store, out, "--quiet")[0] == 0
    before = listing(out)
    code, text = run_cli("export", store, out, "--quiet")
    assert code == 1 and text.startswith("Error: ") and str(out) in text and "never overwrites" in text
    assert "img_emb/img_emb_0.npy" in text and len(text.strip().splitlines()) == 1
    assert listing(out) == before

    foreign = tmp_path / "foreign"  # someone else's parts: not even a lock file is added
    (foreign / "metadata").mkdir(parents=True)
    (foreign / "metadata" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="metadata/notes.txt"):
        export_vectors(store, foreign)
    assert listing(foreign) == {"metadata/notes.txt": b"mine"}

    empty = tmp_path / "empty"  # an existing empty folder is fine
    empty.mkdir()
    assert export_vectors(store, empty)["rows"] == 30
    with pytest.raises(ExportError, match="part_rows"):
        export_vectors(store, tmp_path / "x", part_rows=0)
    assert not (tmp_path / "x").exists()


KILLER = """
import os, signal, sys
from embedstore.pipeline import export_vectors
def die(done, total):
    if done == 5 * 16:  # mid part 2 (parts of 32 rows, chunks of 16): its files are half written
        os.kill(os.getpid(), signal.SIGKILL)
export_vectors(sys.argv[1], sys.argv[2], part_rows=32, chunk_rows=16, progress=die)
"""


def test_sigkill_mid_export_leaves_only_complete_parts(tmp_path: Path) -> None:
    store = make_store(tmp_path, n=200)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(store), str(out)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    npys, parquets = visible_parts(out)
    assert npys == ["img_emb_0.npy", "img_emb_1.npy"] and parquets == ["metadata_0.parquet", "metadata_1.parquet"]
    assert not (out / "embedstore.json").exists()
    hidden = sorted(p.name for sub in ("img_emb", "metadata") for p in (out / sub).iterdir() if p.name.startswith("."))
    assert len(hidden) == 2 and all(".tmp-" in h for h in hidden)  # part 2, killed while being written
    sp = embedstore.open_store(store).space()
    for i in range(2):
        assert np.load(out / "img_emb" / npys[i]).tobytes() == sp.vectors[32 * i:32 * i + 32].tobytes()
        assert pq.read_metadata(out / "metadata" / parquets[i]).num_rows == 32
    assert import_vectors(tmp_path / "partial.h5", out, space="emb")["imported"] == 64  # readable as it is
    with pytest.raises(ExportError, match="holds an export already"):
        export_vectors(store, out)


def test_an_error_mid_export_removes_its_temporary_files(tmp_path: Path) -> None:
    store = make_store(tmp_path, n=100)
    out = tmp_path / "out"

    def fail(done: int, total: int) -> None:
        if done == 48:
            raise KeyboardInterrupt  # what Ctrl-C raises

    with pytest.raises(KeyboardInterrupt):
        export_vectors(store, out, part_rows=32, chunk_rows=16, progress=fail)
    assert visible_parts(out) == (["img_emb_0.npy"], ["metadata_0.parquet"])
    assert [n for n in listing(out) if ".tmp-" in n] == []


# ------------------------------------------------------------------ Arrow and pandas


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_to_arrow_holds_the_stored_dtype_and_the_space_values(tmp_path: Path, dtype: str) -> None:
    sp = embedstore.open_store(make_store(tmp_path, n=40, dtype=dtype)).space("emb")
    table = sp.to_arrow()
    assert table.schema.names == ["path", "label", "split", "vector"] and table.num_rows == 40
    assert table.schema.field("vector").type == pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), DIM)
    flat = table.column("vector").combine_chunks().flatten().to_numpy()
    assert flat.dtype == np.dtype(dtype) and flat.reshape(40, DIM).tobytes() == sp.vectors[:].tobytes()
    assert table.column("path").to_pylist() == sp.paths.tolist()
    assert table.column("label").to_pylist() == [x or None for x in sp.labels.tolist()]  # none is null

    some = sp.to_arrow(columns=["split", "vector", "size"], positions=[7, 2, 30])
    assert some.schema.names == ["split", "vector", "size"]
    rows = np.stack(some.column("vector").to_pylist()).astype(dtype)
    assert rows.tobytes() == sp.vectors[[7, 2, 30]].tobytes()
    assert some.column("split").to_pylist() == [x or None for x in sp.column("split", [7, 2, 30]).tolist()]
    with pytest.raises(StoreError, match="choose from"):
        sp.to_arrow(columns=["vectors"])


def test_to_pandas_gives_one_row_per_position(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    sp = embedstore.open_store(make_store(tmp_path, n=25)).space("emb")
    df = sp.to_pandas(positions=slice(10, 20))
    assert list(df.columns) == ["path", "label", "split", "vector"] and len(df) == 10
    assert df["path"].tolist() == sp.paths[10:20].tolist()
    assert df["vector"].iloc[3].dtype == np.float16 and df["vector"].iloc[3].tobytes() == sp.vectors[13].tobytes()


# ------------------------------------------------------------------ the tools that read the layout


def test_embedding_reader_reads_the_export_with_its_metadata(tmp_path: Path) -> None:
    er = pytest.importorskip("embedding_reader")
    store = make_store(tmp_path, n=115)
    out = tmp_path / "out"
    export_vectors(store, out, part_rows=10)  # 12 parts: name order must be numeric order
    reader = er.EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                                meta_columns=["image_path", "label", "split"])
    sp = embedstore.open_store(store).space()
    assert (reader.count, reader.dimension) == (115, DIM)
    vectors, paths, labels = [], [], []
    for emb, meta in reader(batch_size=32, show_progress=False):
        vectors.append(emb)
        paths += meta["image_path"].tolist()
        labels += [x if isinstance(x, str) else "" for x in meta["label"].tolist()]
    assert np.array_equal(np.concatenate(vectors), sp.vectors[:].astype(np.float32))
    assert paths == sp.paths.tolist() and labels == sp.labels.tolist()


def test_autofaiss_builds_an_index_whose_ids_are_positions(tmp_path: Path) -> None:
    autofaiss = pytest.importorskip("autofaiss")
    store = make_store(tmp_path, n=300)
    out = tmp_path / "out"
    assert run_cli("export", store, out, "--part-rows", "25", "--quiet")[0] == 0  # 12 parts
    index, infos = autofaiss.build_index(embeddings=str(out / "img_emb"), save_on_disk=False, index_path=None,
                                         index_infos_path=None, max_index_memory_usage="100M",
                                         current_memory_available="1G", verbose=40)
    assert index.ntotal == 300 and infos["nb vectors"] == 300
    sp = embedstore.open_store(store).space()
    probe = np.array([3, 120, 299])
    _, ids = index.search(sp.vectors[probe].astype(np.float32), 1)
    assert ids.ravel().tolist() == probe.tolist()
