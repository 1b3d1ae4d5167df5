"""Backbone registry contract, offline default weights, and the other ways to name a model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import embedstore
from embedstore.errors import BackboneError
from embedstore.backbones import REGISTRY, load_backbone, load_space_backbone, weights_checksum
from embedstore.data import ImageItem
from embedstore.embedding import Embedder, embed_items

INSTALLED = [name for name, entry in REGISTRY.items() if entry.installed]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_contract(name: str):
    """Every registered backbone: features of the declared dim, preprocessing from timm's config."""
    if name not in INSTALLED:
        pytest.skip(f"{REGISTRY[name].package} is not installed")
    listed = {r["name"]: r for r in embedstore.list_backbones()}[name]
    bb = load_backbone(name)
    assert bb.dim == listed["dim"]
    assert bb.data_config["input_size"][-1] == listed["input_size"]
    assert bb.data_config["mean"] == [0.5, 0.5, 0.5]  # TF-ported weights: mean/std 0.5
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert bb.weights_sha256 == weights_checksum(bb.model)
    with torch.inference_mode():
        out = bb.model(torch.rand(2, 3, *bb.data_config["input_size"][1:]))
    assert out.shape == (2, bb.dim) and torch.isfinite(out).all()


def test_default_backbone_labels_sample_photos(tmp_path: Path):
    """The offline ImageNet weights are really loaded: china.jpg -> palace, flower.jpg -> daisy."""
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    paths = []
    for name in ("china.jpg", "flower.jpg"):
        Image.fromarray(load_sample_image(name)).save(tmp_path / name)
        paths.append(tmp_path / name)
    embedder = Embedder(load_backbone(classifier=True), device="cpu", precision="fp32")
    logits, _ = embed_items([ImageItem(str(p), p.name) for p in paths], embedder, workers=0)
    info = ImageNetInfo()
    labels = [info.index_to_description(int(i)) for i in logits.argmax(1)]
    assert labels == ["palace", "daisy"]


def test_weights_file_roundtrip_gives_same_space(tmp_path: Path):
    bb = load_backbone("test_efficientnet", weights="random")
    ckpt = tmp_path / "tiny.pth"
    torch.save(bb.model.state_dict(), ckpt)
    again = load_backbone("test_efficientnet", weights=str(ckpt))
    assert again.weights_sha256 == bb.weights_sha256
    assert again.weights == str(ckpt)


def test_safetensors_weights(tmp_path: Path):
    from safetensors.torch import save_file

    bb = load_backbone("test_efficientnet", weights="random")
    path = tmp_path / "tiny.safetensors"
    save_file(bb.model.state_dict(), str(path))
    assert load_backbone("test_efficientnet", weights=str(path)).weights_sha256 == bb.weights_sha256


def test_random_weights_are_seeded():
    a = load_backbone("test_vit", weights="random")
    b = load_backbone("test_vit", weights="random")
    assert a.weights_sha256 == b.weights_sha256


def test_torchvision_backbone_with_random_weights():
    bb = load_backbone("torchvision:resnet18", weights="random")
    assert bb.dim == 512
    assert bb.data_config["input_size"] == [3, 224, 224]
    assert bb.data_config["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_unknown_backbone_names_the_fix():
    with pytest.raises(BackboneError, match="embedstore backbones"):
        load_backbone("no_such_model_anywhere")


def test_offline_pretrained_gives_clear_error():
    """No network here: a timm name whose weights are not cached fails at once, naming what works."""
    if embedstore.backbones.load._hub_reachable():
        pytest.skip("the hub is reachable from this machine")
    with pytest.raises(BackboneError, match="work offline"):
        load_backbone("resnet10t")


def test_missing_weights_file_is_named(tmp_path: Path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("test_efficientnet", weights=str(tmp_path / "missing.pth"))


def test_space_backbone_refuses_other_weights():
    bb = load_backbone("test_efficientnet", weights="random")
    attrs = {**bb.space_attrs(), "weights_sha256": "0" * 64}
    with pytest.raises(BackboneError, match="differ"):
        load_space_backbone(attrs)
    assert load_space_backbone(bb.space_attrs()).weights_sha256 == bb.weights_sha256


def test_embeddings_are_deterministic_and_batch_independent(tmp_path: Path):
    from imagegen import make_collection

    root = make_collection(tmp_path, per_class=3, splits=())
    _, items = embedstore.discover(root)
    embedder = Embedder(load_backbone("test_efficientnet", weights="random"), precision="fp32")
    a, _ = embed_items(items, embedder, batch_size=9, workers=0)
    b, _ = embed_items(items, embedder, batch_size=4, workers=1)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_table_matches_the_architecture(name: str):
    """The static table `embedstore backbones` prints (dim, input size) is what the model really has."""
    import timm

    entry = REGISTRY[name]
    model = timm.create_model(entry.timm_arch, pretrained=False, num_classes=0).eval()
    side = timm.data.resolve_data_config({}, model=model)["input_size"][-1]
    with torch.inference_mode():
        dim = model(torch.zeros(1, 3, side, side)).shape[-1]
    assert (entry.dim, entry.input_size) == (dim, side) == (model.num_features, side)


def test_cli_backbones_builds_no_model():
    """Listing is a table lookup: torch and timm are never imported (it took 6.7 s when they were)."""
    import json
    import subprocess
    import sys

    probe = ("import json, sys\nfrom embedstore_cli.main import main\ntry:\n    main(['backbones', '--json'])\n"
             "except SystemExit:\n    pass\nprint(json.dumps(sorted(m for m in ('torch', 'timm') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    rows, heavy = out.stdout.rsplit("\n", 2)[0], json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [] and '"efficientnet_lite0"' in rows


def test_cli_backbones_check_loads_the_installed_ones():
    from click.testing import CliRunner

    from embedstore_cli.main import main

    res = CliRunner().invoke(main, ["backbones", "--check", "--json"])
    assert res.exit_code == 0, res.output
    import json

    checks = {r["name"]: r["check"] for r in json.loads(res.output)}
    assert checks == {n: "ok" if n in INSTALLED else "not installed" for n in REGISTRY}


def _bad_weights(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "other_arch":
        torch.save(load_backbone("test_vit", weights="random").model.state_dict(), path)
    elif kind == "not_a_state_dict":
        torch.save([1, 2, 3], path)
    return path


@pytest.mark.parametrize("kind,says", [
    ("garbage", "not a readable checkpoint"),
    ("empty", r"is empty \(0 bytes\)"),
    ("other_arch", "does not fit test_efficientnet"),
    ("not_a_state_dict", "not a readable checkpoint|no state dict of tensors"),
])
def test_bad_weights_file_names_the_file_and_what_was_expected(tmp_path: Path, kind: str, says: str):
    path = _bad_weights(tmp_path, kind)
    with pytest.raises(BackboneError, match=says) as err:
        load_backbone("test_efficientnet", weights=str(path))
    message = str(err.value)
    assert str(path) in message and "state dict of test_efficientnet" in message and "\n" not in message


def test_cli_bad_weights_file_is_one_line(tmp_path: Path):
    from click.testing import CliRunner

    from embedstore_cli.main import main
    from imagegen import make_collection

    folder = make_collection(tmp_path / "photos", per_class=1, splits=())
    path = _bad_weights(tmp_path, "other_arch")
    res = CliRunner().invoke(main, ["embed", str(folder), "--backbone", "test_efficientnet", "--weights", str(path),
                                    "--workers", "0", "--quiet"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("Error: weights file")
    assert "does not fit test_efficientnet" in res.output and "cls_token" in res.output
