"""Inference runtimes (issue 19): eager torch, ONNX Runtime and OpenVINO behind one Embedder contract.

The exported graph is cached and validated once against eager torch fp32 on real images (cosine >= 0.999
per image), a refused or broken runtime falls back to torch with a note, and one space takes the vectors
of any runtime. Every test uses the session's runtime cache (conftest) or its own, never the user's.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import embedstore
from embedstore.backbones.load import load_backbone
from embedstore.choices import RUNTIME_PRECISIONS
from embedstore.data.collection import discover
from embedstore.embedding import Embedder, embed_items, runtimes
from embedstore.embedding import onnx as onnx_rt
from embedstore.embedding.runtimes import TOLERANCE, cosines, load_embedder
from embedstore.errors import EmbedOptionError
from embedstore.store.integrity import merge_runtimes
from embedstore_cli.main import main
from imagegen import TINY_BACKBONE

EXPORTED = [r for r in ("onnxruntime", "openvino") if onnx_rt.runtime_version(r) is not None]
needs_ort = pytest.mark.skipif("onnxruntime" not in EXPORTED, reason="onnxruntime is not installed")


@pytest.fixture
def tiny():
    return load_backbone(TINY_BACKBONE, "random")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(onnx_rt.CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="session")
def session_exports(_runtime_cache: Path, session_tiny_store: tuple[Path, Path]) -> Path:
    """The session's runtime cache with the tiny backbone exported (and validated) for each installed runtime."""
    _, items = discover(session_tiny_store[0])
    for runtime in EXPORTED:
        assert not load_embedder(load_backbone(TINY_BACKBONE, "random"), runtime, "cpu", items=items).notes
    return _runtime_cache


@pytest.fixture
def seeded_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session_exports: Path) -> Path:
    """A cache of this test's own holding the session's exports (no probe)."""
    folder = tmp_path / "seeded"
    shutil.copytree(session_exports / "runtimes", folder / "runtimes", ignore=shutil.ignore_patterns("probe-*"))
    monkeypatch.setenv(onnx_rt.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The backbone names exported from now on (the real export runs)."""
    done: list[str] = []
    real = onnx_rt.export_onnx

    def counted(backbone):
        done.append(backbone.name)
        return real(backbone)

    monkeypatch.setattr(onnx_rt, "export_onnx", counted)
    return done


def _embed(collection: Path, store: Path, runtime: str, **kw) -> dict:
    return embedstore.embed(collection, store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False,
                            runtime=runtime, **kw)


def _vectors(store: Path) -> dict[str, np.ndarray]:
    st = embedstore.open_store(store)
    sp = next(iter(st.spaces.values()))
    paths = st.image_column("path", sp.rows)
    return dict(zip(paths, np.asarray(sp.vectors[:], np.float32)))


@needs_ort
def test_export_validation_and_cache_reuse(tmp_path: Path, collection: Path, fresh_cache: Path,
                                           exports: list[str]) -> None:
    import onnx

    first = _embed(collection, tmp_path / "a.h5", "onnxruntime")
    assert first["runtime"] == f"onnxruntime {onnx_rt.runtime_version('onnxruntime')}" and first["notes"] == []
    assert exports == [TINY_BACKBONE]
    (entry,) = (fresh_cache / "runtimes").glob("test_efficientnet-onnxruntime-*")
    meta = json.loads((entry / "entry.json").read_text())
    assert meta["key"]["weights_sha256"] == load_backbone(TINY_BACKBONE, "random").weights_sha256
    assert meta["key"]["input_size"] == [3, 160, 160] and meta["key"]["opset"] == onnx_rt.OPSET
    assert meta["validation"]["images"] == runtimes.SAMPLE_IMAGES and meta["validation"]["min_cosine"] >= TOLERANCE
    graph = onnx.load(str(entry / "model.onnx")).graph
    (x,), (y,) = graph.input, graph.output
    assert x.type.tensor_type.elem_type == onnx.TensorProto.UINT8  # normalisation is in the graph
    assert x.type.tensor_type.shape.dim[0].dim_param and y.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [d.dim_value for d in y.type.tensor_type.shape.dim][1:] == [256]  # pooled, as Backbone.model returns

    def no_check(*a, **k):
        raise AssertionError("validated again")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(runtimes, "cosines", no_check)
        second = _embed(collection, tmp_path / "b.h5", "onnxruntime")
    assert second["runtime"] == first["runtime"] and exports == [TINY_BACKBONE]  # neither exported nor validated again
    assert _vectors(tmp_path / "a.h5").keys() == _vectors(tmp_path / "b.h5").keys()


@pytest.mark.parametrize("precision", ["auto", "fp32"])
@pytest.mark.parametrize("runtime", EXPORTED)
def test_runtime_vectors_agree_with_eager_fp32(runtime: str, precision: str, collection: Path, tiny,
                                               session_exports: Path) -> None:
    """auto: OpenVINO computes bf16 where the CPU has it (held to 0.99), everything else fp32 (0.999)."""
    from embedstore.embedding.embedder import cpu_has_bf16

    _, items = discover(collection)
    emb = load_embedder(tiny, runtime, "cpu", precision, items=items)
    want = "bf16" if runtime == "openvino" and precision == "auto" and cpu_has_bf16() else "fp32"
    assert emb.precision == want and emb.runtime == f"{runtime} {onnx_rt.runtime_version(runtime)}" + (
        " bf16" if want == "bf16" else "")
    assert emb.min_cosine >= runtimes.TOLERANCES[want] and not emb.notes
    got, results = embed_items(items, emb, batch_size=7, workers=0)  # 36 images: batches of 7 and a last of 1
    ref, _ = embed_items(items, Embedder(tiny, device="cpu", precision="fp32"), batch_size=7, workers=0)
    assert got.dtype == np.float32 and got.shape == (len(items), tiny.dim) and not any(r.error for r in results)
    assert cosines(got, ref).min() >= runtimes.TOLERANCES[want]


@needs_ort
def test_failed_validation_falls_back_to_torch_with_a_note(tmp_path: Path, collection: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(runtimes.TOLERANCES, "fp32", 1.5)  # no runtime can reach it
    out = _embed(collection, tmp_path / "s.h5", "onnxruntime")
    assert out["runtime"].startswith("torch ") and out["embedded"] == 36
    (note,) = out["notes"]
    assert "onnxruntime" in note and "refused for test_efficientnet" in note and "at least 1.5 per image is needed in fp32" in note
    assert note.endswith(f"embedding with {out['runtime']}")
    attrs = next(iter(embedstore.open_store(tmp_path / "s.h5").spaces.values())).attrs
    assert attrs["runtime"] == out["runtime"] and attrs.get("runtime_min_cosine") is None


@needs_ort
def test_unwritable_cache_falls_back_to_torch(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(onnx_rt.CACHE_ENV, str(tmp_path / "file" / "cache"))
    emb = load_embedder(tiny, "onnxruntime", "cpu")
    assert emb.runtime.startswith("torch ") and "cannot be used" in emb.notes[0]
    assert "set EMBEDSTORE_CACHE to a writable folder" in emb.notes[0]


@needs_ort
def test_corrupt_cache_is_exported_again(tmp_path: Path, collection: Path, tiny, seeded_cache: Path,
                                         exports: list[str]) -> None:
    _, items = discover(collection)
    (entry,) = (seeded_cache / "runtimes").glob("*-onnxruntime-*")
    model = entry / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    emb = load_embedder(tiny, "onnxruntime", "cpu", items=items)
    assert emb.runtime.startswith("onnxruntime") and not emb.notes and len(exports) == 1
    (entry / "entry.json").write_text("{not json")
    emb = load_embedder(tiny, "onnxruntime", "cpu", items=items)
    assert emb.runtime.startswith("onnxruntime") and len(exports) == 2
    assert json.loads((entry / "entry.json").read_text())["validation"]["min_cosine"] >= TOLERANCE
    got, _ = embed_items(items[:5], emb, workers=0)
    ref, _ = embed_items(items[:5], Embedder(tiny, "cpu", "fp32"), workers=0)
    assert cosines(got, ref).min() >= TOLERANCE


@needs_ort
def test_one_space_takes_vectors_of_two_runtimes(tmp_path: Path, collection: Path) -> None:
    """Half the images embedded by torch fp32, the other half later by onnxruntime, into the same space;
    each image's stored vector agrees with both runtimes' to a cosine of 0.999 or better."""
    aside = tmp_path / "aside"
    moved = sorted(collection.rglob("*.png"))[::2]
    for p in moved:
        (aside / p.relative_to(collection)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, aside / p.relative_to(collection))
    mixed = tmp_path / "mixed.h5"
    first = _embed(collection, mixed, "torch", precision="fp32")
    for p in moved:
        shutil.move(aside / p.relative_to(collection), p)
    second = _embed(collection, mixed, "onnxruntime")
    assert (first["embedded"], second["embedded"], second["skipped"]) == (18, 18, 18)
    assert first["runtime"].startswith("torch ") and second["runtime"].startswith("onnxruntime ")
    st = embedstore.open_store(mixed)
    attrs = next(iter(st.spaces.values())).attrs
    assert attrs["runtime"] == first["runtime"] and attrs["runtimes"] == [first["runtime"], second["runtime"]]
    assert attrs["runtime_min_cosine"] >= TOLERANCE
    assert st.summary()["spaces"][0]["runtimes"] == attrs["runtimes"]
    _embed(collection, tmp_path / "torch.h5", "torch", precision="fp32")
    _embed(collection, tmp_path / "ort.h5", "onnxruntime")
    got, ref, ort = _vectors(mixed), _vectors(tmp_path / "torch.h5"), _vectors(tmp_path / "ort.h5")
    assert got.keys() == ref.keys() == ort.keys() and len(got) == 36
    for path in got:
        assert cosines(got[path][None], ref[path][None])[0] >= TOLERANCE, path
        assert cosines(ort[path][None], ref[path][None])[0] >= TOLERANCE, path


def test_runtime_lineage_merge_rule() -> None:
    old = {"runtime": "torch 2.4.1 bf16", "runtimes": ["torch 2.4.1 bf16"]}
    assert merge_runtimes(old, {"runtime": "torch 2.4.1 bf16", "runtimes": ["torch 2.4.1 bf16"]}) == {}
    new = {"runtime": "openvino 2024.4.0", "runtimes": ["openvino 2024.4.0"], "runtime_min_cosine": 0.99991}
    assert merge_runtimes(old, new) == {"runtimes": ["torch 2.4.1 bf16", "openvino 2024.4.0"],
                                        "runtime_min_cosine": 0.99991}
    legacy = {"precision": "fp32", "versions": {"torch": "2.3.0+cpu"}}  # a space from before runtimes were recorded
    assert merge_runtimes(legacy, new)["runtimes"] == ["torch 2.3.0 fp32", "openvino 2024.4.0"]


@needs_ort
def test_cli_runtime_option(tmp_path: Path, collection: Path) -> None:
    runner = CliRunner()
    base = ["embed", str(collection), "--store", str(tmp_path / "c.h5"), "--backbone", TINY_BACKBONE,
            "--weights", "random", "--workers", "0", "--quiet"]
    res = runner.invoke(main, base + ["--runtime", "onnxruntime", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["runtime"].startswith("onnxruntime ")
    res = runner.invoke(main, ["info", str(tmp_path / "c.h5")])
    assert res.exit_code == 0 and "runtime" in res.output and "onnxruntime " in res.output, res.output
    res = runner.invoke(main, base + ["--runtime", "tensorrt"])
    assert res.exit_code == 2 and "Invalid value for '--runtime'" in res.output
    res = runner.invoke(main, base + ["--runtime", "onnxruntime", "--precision", "bf16"])
    assert res.exit_code == 1 and res.output.startswith("Error: precision 'bf16' is not one onnxruntime computes in")
    help_text = " ".join(runner.invoke(main, ["embed", "--help"]).output.split())
    assert "--runtime [auto|torch|onnxruntime|openvino]" in help_text and "0.999 in fp32, 0.99 in bf16" in help_text


def test_runtime_refusals(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmbedOptionError, match="runtime must be one of auto, torch, onnxruntime, openvino"):
        load_embedder(tiny, "tensorrt", "cpu")
    with pytest.raises(EmbedOptionError, match="runtime 'openvino' runs on the CPU here"):
        runtimes.check_runtime("openvino", "cuda:0", "auto")
    with pytest.raises(EmbedOptionError, match=r"precision 'bf16' is not one onnxruntime computes in here \(fp32\)"):
        runtimes.check_runtime("onnxruntime", "cpu", "bf16")
    with pytest.raises(EmbedOptionError, match=r"precision 'fp16' is not one openvino computes in here \(fp32, bf16\)"):
        runtimes.check_runtime("openvino", "cpu", "fp16")
    monkeypatch.setattr(runtimes, "runtime_version", lambda name: None)
    hint = r'not installed: pip install openvino or pip install "tl-embedstore\[openvino\]"'
    with pytest.raises(EmbedOptionError, match=hint):
        load_embedder(tiny, "openvino", "cpu")


def test_auto_picks_a_sensible_runtime(collection: Path, tiny, seeded_cache: Path, exports: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from embedstore.embedding.embedder import cpu_has_bf16

    _, items = discover(collection)
    small = load_embedder(tiny, "auto", "cpu", items=items, images=len(items))  # a small run: no export, no probe
    assert small.runtime.startswith("torch ") and exports == [] and "probed for runs of 1000" in small.notes[0]
    bf16 = load_embedder(tiny, "auto", "cpu", "bf16", items=items, images=None)  # torch or OpenVINO, in bf16
    assert bf16.runtime.split()[0] in ("torch", "openvino") and bf16.precision == "bf16" or not cpu_has_bf16()
    big = load_embedder(tiny, "auto", "cpu", items=items, images=None)  # probes
    expected = {"torch " + onnx_rt.torch_version() + (" bf16" if cpu_has_bf16() else " fp32")}
    expected |= {f"{r} {onnx_rt.runtime_version(r)}" + (" bf16" if r == "openvino" and cpu_has_bf16() else "")
                 for r in EXPORTED}
    assert big.runtime in expected and "auto:" in big.notes[-1] and "img/s" in big.notes[-1]
    assert exports == []  # the exports on record are used
    probes = [json.loads(p.read_text())["key"] for p in (seeded_cache / "runtimes").glob("probe-*.json")]
    assert len(probes) == 2 and {k["backbone"] for k in probes} == {TINY_BACKBONE}  # the bf16 one and auto's
    assert {tuple(k["exported_precisions"]) for k in probes} == {("openvino",), tuple(EXPORTED)} or "openvino" not in EXPORTED

    def no_probe(*a, **k):
        raise AssertionError("probed again")

    monkeypatch.setattr(runtimes, "time_candidates", no_probe)
    again = load_embedder(tiny, "auto", "cpu", items=items, images=3)  # the probe on record decides, any size
    assert again.runtime == big.runtime and exports == []


@pytest.mark.slow
@pytest.mark.parametrize("runtime", EXPORTED)
def test_every_registry_backbone_exports_and_matches_eager(runtime: str, collection: Path) -> None:
    """Contract: every installed registry backbone exports to ONNX (with its pooling) and matches eager fp32, in each
    precision the runtime computes in."""
    from embedstore.backbones.registry import REGISTRY

    _, items = discover(collection)
    names = [n for n, e in REGISTRY.items() if e.installed]
    assert names, "no registry backbone is installed"
    for name in names:
        bb = load_backbone(name)
        ref, _ = embed_items(items, Embedder(bb, "cpu", "fp32"), batch_size=16, workers=0)
        for precision in RUNTIME_PRECISIONS[runtime]:  # OpenVINO in bf16 too (fp32 where the CPU has no bf16)
            emb = onnx_rt.SessionEmbedder(bb, runtime, precision=precision)
            tolerance = runtimes.TOLERANCES[emb.precision]
            assert runtimes.validate(emb, runtimes.sample_images(items, bb)) >= tolerance, (name, precision)
            got, _ = embed_items(items, emb, batch_size=16, workers=0)
            assert got.shape == (len(items), bb.dim) and cosines(got, ref).min() >= tolerance, (name, precision)


@pytest.mark.parametrize("runtime", EXPORTED)
def test_streams_split_and_queue_batches_in_order(runtime: str, collection: Path, tiny, seeded_cache: Path) -> None:
    """With 2+ threads a batch runs as single-threaded parts side by side, and the next batches are queued
    behind it (iter_embeddings submits ahead): every row comes back in its own place."""
    _, items = discover(collection)
    batch = runtimes.sample_images(items, tiny, n=5)
    one = onnx_rt.SessionEmbedder(tiny, runtime, threads=1)
    two = onnx_rt.SessionEmbedder(tiny, runtime, threads=2)
    assert one.precision == two.precision == "fp32" and two.session.streams == 2
    ref = np.concatenate([one(batch[i:i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(two(batch), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two(batch[:1]), ref[:1], rtol=1e-4, atol=1e-5)  # fewer rows than streams
    queued = [two.submit(batch[i:]) for i in range(len(batch))]  # five batches in flight at once
    for i, pending in enumerate(queued):
        np.testing.assert_allclose(pending.result(), ref[i:], rtol=1e-4, atol=1e-5)
    got, results = embed_items(items, two, batch_size=4, workers=1)  # 9 batches, each submitted before the last is read
    want, _ = embed_items(items, one, batch_size=4, workers=0)
    assert [r.index for r in results] == list(range(len(items)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


OUT_OF_ORDER = """
import gc, sys
from embedstore.backbones.load import load_backbone
from embedstore.choices import RUNTIME_PRECISIONS
from embedstore.data.collection import discover
from embedstore.embedding import Embedder, embed_items
from embedstore.embedding.onnx import SessionEmbedder
tiny = load_backbone(sys.argv[1], "random")
_, items = discover(sys.argv[2])
a, b, c = (SessionEmbedder(tiny, "openvino") for _ in range(3))
del b; gc.collect(); del c; gc.collect()  # freed out of the order they were made in
for _ in range(2):  # each run ends with its decode worker's exit: a SIGCHLD to this thread
    got, _ = embed_items(items, Embedder(tiny, "cpu", "fp32"), batch_size=8, workers=1)
print("ok", len(got))
"""


@pytest.mark.skipif("openvino" not in EXPORTED, reason="openvino is not installed")
def test_openvino_models_freed_out_of_order_leave_signals_deliverable(collection: Path, seeded_cache: Path) -> None:
    """Regression: OpenVINO models compiled on the calling thread and freed out of order left that thread's
    signal stack pointing at freed memory, and the next signal (a DataLoader worker's exit) killed the
    process with SIGSEGV (exit 139). Run in a child process, which such a bug kills."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", OUT_OF_ORDER, TINY_BACKBONE, str(collection)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, onnx_rt.CACHE_ENV: str(seeded_cache)})
    assert done.returncode == 0 and done.stdout.split() == ["ok", "36"], (done.returncode, done.stderr[-2000:])


@pytest.mark.skipif("openvino" not in EXPORTED, reason="openvino is not installed")
def test_openvino_reports_the_precision_it_computes_in(tiny, seeded_cache: Path) -> None:
    """The precision recorded is the compiled model's own: bf16 asked of a CPU without bf16 is fp32."""
    import openvino as ov

    from embedstore.embedding.embedder import cpu_has_bf16

    path = str(onnx_rt.CacheEntry(tiny, "openvino").model)
    core = ov.Core()
    for asked, want in (("fp32", "fp32"), ("bf16", "bf16" if cpu_has_bf16() else "fp32")):
        hint = onnx_rt.OPENVINO_PRECISIONS[asked]
        with ThreadPoolExecutor(1) as once:  # compiled off this thread, as embedstore does (see the test above)
            compiled = once.submit(core.compile_model, core.read_model(path), "CPU",
                                   {"INFERENCE_PRECISION_HINT": hint}).result()
        assert onnx_rt.openvino_precision(compiled) == want, hint
        assert onnx_rt.SessionEmbedder(tiny, "openvino", precision=asked).precision == want
