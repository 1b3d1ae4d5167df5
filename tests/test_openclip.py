"""CLIP backbones through open_clip (``open_clip:ARCH``), text queries and their offline weights rules,
with the tiny randomly initialised CLIP of tests/support/tiny_clip.py (no download, seconds)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("open_clip")

import torch  # noqa: E402

from embedstore.backbones import load_backbone, load_space_backbone, weights_arg, weights_checksum  # noqa: E402
from embedstore.embedding.text import embed_texts, encode_texts, has_text_tower  # noqa: E402
from embedstore.errors import BackboneError, QueryError  # noqa: E402
from embedstore.search import search  # noqa: E402
from embedstore.store import open_store  # noqa: E402
from support.tiny_clip import TINY_CLIP, TINY_CLIP_DIM, embed_tiny_clip, register_tiny_clip  # noqa: E402

TEXTS = ["a photo of a red disc", "green square"]


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the generated collection in the tiny CLIP's space (read only: tests never change it)."""
    return embed_tiny_clip(tmp_path_factory.mktemp("clip"))[1]


@pytest.fixture(scope="module")
def tiny() -> object:
    register_tiny_clip()
    return load_backbone(TINY_CLIP, weights="random")


def test_backbone_maps_images_to_the_projected_embedding_with_a_timm_data_config(tiny) -> None:
    from PIL import Image

    assert tiny.dim == TINY_CLIP_DIM and tiny.weights == "random" and not tiny.model.training
    cfg = tiny.data_config
    assert cfg["input_size"] == [3, 64, 64] and cfg["crop_mode"] == "center" and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073]) and cfg["interpolation"] == "bicubic"
    x = tiny.eval_transform()(Image.new("RGB", (90, 70), (200, 30, 30)))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 64, 64)
    batch = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(tiny.model(batch), tiny.model.clip.encode_image(batch))
    attrs = tiny.space_attrs()
    assert attrs["text_tower"] is True and attrs["versions"]["open_clip"] and has_text_tower(attrs)
    assert attrs["weights_sha256"] == weights_checksum(tiny.model)
    again = load_backbone(TINY_CLIP, weights="random")  # seeded: the same network every time
    assert again.weights_sha256 == tiny.weights_sha256
    with torch.no_grad():  # the checksum covers the text tower: another text tower is another space
        again.model.clip.token_embedding.weight[0, 0] += 1
    assert weights_checksum(again.model) != tiny.weights_sha256


def test_text_encoder_gives_unit_vectors_in_the_image_space(tiny) -> None:
    v = encode_texts(tiny, TEXTS)
    assert v.shape == (2, TINY_CLIP_DIM) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, rtol=1e-5)
    raw = tiny.extra["text_tower"].encode(TEXTS)
    np.testing.assert_allclose(v, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(encode_texts(tiny, TEXTS[:1], device="cpu"), v[:1], atol=1e-5)
    for bad, match in (("a cat", "list of strings"), ([], "no text query"), (["", "x"], "non-empty")):
        with pytest.raises(QueryError, match=match):
            encode_texts(tiny, bad)
    with pytest.raises(QueryError, match="no text tower"):
        encode_texts(load_backbone("test_efficientnet", weights="random"), TEXTS)


def test_space_records_the_text_tower_and_a_later_load_checks_the_checksum(clip_store: Path, tiny) -> None:
    sp = open_store(clip_store).space()
    assert sp.name == "TinyTestCLIP-random" and sp.dim == TINY_CLIP_DIM
    assert sp.attrs["backbone"] == TINY_CLIP and sp.attrs["text_tower"] is True
    assert sp.attrs["weights_sha256"] == tiny.weights_sha256 and sp.attrs["versions"]["open_clip"]
    assert load_space_backbone(sp.attrs).weights_sha256 == tiny.weights_sha256
    with pytest.raises(BackboneError, match="differ from the ones that built this space"):
        load_space_backbone({**sp.attrs, "weights_sha256": "0" * 64})


def test_text_search_ranks_the_space_by_the_texts_embedding(clip_store: Path, tiny) -> None:
    res = search(clip_store, texts=TEXTS, k=4, exclude_self=True)
    assert res["queries"] == [{"query": f"text: {t}"} for t in TEXTS]
    assert len(res["results"]) == 2 and all(len(hits) == 4 for hits in res["results"])
    for hits in res["results"]:
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        assert {"path", "row", "label", "score"} <= set(hits[0])
    assert any("no effect on text queries" in n for n in res["notes"])
    # the same as searching with the text embeddings as vectors
    same = search(clip_store, vectors=encode_texts(tiny, TEXTS), k=4)
    assert [[h["row"] for h in hits] for hits in same["results"]] == [[h["row"] for h in hits] for hits in res["results"]]
    np.testing.assert_allclose(embed_texts(open_store(clip_store).space(), TEXTS, device="cpu"),
                               encode_texts(tiny, TEXTS), atol=1e-5)
    with pytest.raises(QueryError, match="exactly one kind"):
        search(clip_store, texts=TEXTS, rows=[0])


def test_text_search_refuses_a_space_without_a_text_tower(tiny_store: Path) -> None:
    with pytest.raises(QueryError, match="no text tower.*open_clip: backbone"):
        search(tiny_store, texts=["a cat"])
    with pytest.raises(QueryError, match="open_clip"):
        embed_texts(open_store(tiny_store).space(), ["a cat"])


def test_cli_search_text(clip_store: Path, tiny_store: Path) -> None:
    from embedstore_cli.main import main

    runner = CliRunner()
    res = runner.invoke(main, ["search", str(clip_store), "--text", TEXTS[0], "--text", TEXTS[1], "-k", "3",
                               "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [q["query"] for q in out["queries"]] == [f"text: {t}" for t in TEXTS]
    assert [len(h) for h in out["results"]] == [3, 3]
    res = runner.invoke(main, ["search", str(clip_store), "--text", "a red disc", "-k", "2"])
    assert res.exit_code == 0 and "query text: a red disc" in res.stdout and "rank" in res.stdout, res.output
    res = runner.invoke(main, ["search", str(tiny_store), "--text", "a red disc"])
    assert res.exit_code == 1 and "Error:" in res.output and "open_clip" in res.output, res.output
    res = runner.invoke(main, ["search", str(clip_store), "--text", "x", "--row", "0"])
    assert res.exit_code == 2 and "--text TEXT" in res.output
    assert "--text TEXT" in runner.invoke(main, ["search", "--help"]).output


def test_fine_tuning_a_clip_space_is_refused_before_anything_is_written(clip_store: Path) -> None:
    import embedstore
    from embedstore.errors import FinetuneError

    with pytest.raises(FinetuneError, match="CLIP space.*not supported"):
        embedstore.finetune(clip_store, epochs=1, device="cpu")
    assert not Path(f"{clip_store}.finetune").exists()


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline machine whose Hugging Face cache and open_clip URL cache are empty."""
    import huggingface_hub.constants as hub

    from embedstore.backbones import openclip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(openclip, "CLIP_CACHE", str(tmp_path / "clip"))
    return tmp_path / "hub"


def test_missing_pretrained_weights_offline_name_the_fix(empty_caches: Path) -> None:
    with pytest.raises(BackboneError) as e:
        load_backbone("open_clip:ViT-B-32", weights="laion2b_s34b_b79k")
    text = str(e.value)
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in text and "not in the local cache" in text
    assert "machine with network" in text and "--weights FILE" in text and "random" in text
    with pytest.raises(BackboneError, match="no pretrained weights of open_clip:ViT-B-32.*laion2b_s34b_b79k"):
        load_backbone("open_clip:ViT-B-32")
    with pytest.raises(BackboneError, match="neither a file nor an open_clip pretrained tag.*laion2b_s34b_b79k"):
        load_backbone("open_clip:ViT-B-32", weights="no_such_tag")
    with pytest.raises(BackboneError, match="unknown open_clip architecture 'ViT-Q-99'"):
        load_backbone("open_clip:ViT-Q-99", weights="random")


def test_a_pretrained_tag_loads_from_the_local_hugging_face_cache(empty_caches: Path, tiny,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A tag's checkpoint is found in the HF cache layout offline, with the tag's preprocessing; the
    recorded source reloads the same weights (what load_space_backbone does for a stored space)."""
    import open_clip

    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "TinyTestCLIP", {"tiny_tag": {
        "hf_hub": "embedstore-test/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
        "interpolation": "bilinear", "resize_mode": "squash"}})
    snapshot = empty_caches / "models--embedstore-test--tiny-clip" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        trained = open_clip.create_model("TinyTestCLIP")
    torch.save(trained.state_dict(), snapshot / "open_clip_pytorch_model.bin")

    bb = load_backbone(TINY_CLIP, weights="tiny_tag")
    assert bb.weights == "open_clip:tiny_tag" and weights_arg(bb.weights) == "tiny_tag"
    assert bb.weights_sha256 != tiny.weights_sha256
    assert bb.data_config["mean"] == [0.5, 0.5, 0.5] and bb.data_config["std"] == [0.25, 0.25, 0.25]
    assert bb.data_config["interpolation"] == "bilinear" and bb.data_config["crop_mode"] == "squash"
    assert load_space_backbone(bb.space_attrs()).weights_sha256 == bb.weights_sha256
    assert load_backbone(TINY_CLIP).weights == "open_clip:tiny_tag"  # no tag: the first one in the cache


def test_a_local_checkpoint_file(tmp_path: Path, tiny) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.clip.state_dict(), path)
    bb = load_backbone(TINY_CLIP, weights=str(path))
    assert bb.weights == str(path) and bb.weights_sha256 == tiny.weights_sha256
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=f"cannot load {bad} into open_clip:TinyTestCLIP"):
        load_backbone(TINY_CLIP, weights=str(bad))


def test_importing_the_library_imports_neither_open_clip_nor_torch() -> None:
    code = ("import sys, embedstore, embedstore.search, embedstore.heads, embedstore.backbones, embedstore.choices; "
            "print(sorted(m for m in ('open_clip', 'torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
