"""finetune: LP-FT beats the frozen probe on a task random features miss; frozen stages stay put;
a stopped run resumes into the same weights; the new space records its lineage and reloads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import embedstore
from imagegen import TINY_BACKBONE, make_collection
from embedstore.backbones import load_backbone, load_space_backbone
from embedstore.data import decode_image
from embedstore.errors import EmbedstoreError
from embedstore.finetuning import finetune
from embedstore.finetuning import sha256_file, stage_groups
from embedstore_cli.finetune_commands import register

FAST = dict(precision="fp32", workers=0, progress=False)


def stripes(cls: int, seed: int, size: int = 64) -> Image.Image:
    """Faint horizontal (0) or vertical (1) stripes, random period and phase, in grey noise.

    Both classes have the same colours and the same amount of pattern; only the orientation of
    a weak intensity modulation (35 levels against noise of standard deviation 30) differs.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.normal(128, 30, (size, size, 3))
    period = int(rng.integers(6, 12))
    yy, xx = np.mgrid[:size, :size]
    mask = (((yy if cls == 0 else xx) + int(rng.integers(0, period))) % period) < period // 2
    pixels[mask] += int(rng.choice([-1, 1])) * 35
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def calibrated_random_backbone(images: list[Path], path: Path) -> Path:
    """timm's tiny test network, random weights, batch-norm statistics measured on ``images``.

    Untrained running statistics (0 and 1) make activations vanish layer after layer; measured
    ones give an untrained but well-scaled network, as a pretrained one would be.
    """
    bb = load_backbone(TINY_BACKBONE, weights="random")
    tf = bb.eval_transform()
    x = torch.stack([tf(decode_image(p.read_bytes())) for p in images]).float()
    cfg = bb.data_config
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255) / (torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255)
    for m in bb.model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the one batch
    bb.model.train()
    with torch.no_grad():
        bb.model(x)
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def stripes_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Faint stripe orientation, 40 train / 30 val images per class, embedded with the calibrated random network."""
    root = tmp_path_factory.mktemp("stripes")
    seed = 0
    for split, n in (("train", 40), ("val", 30)):
        for cls in (0, 1):
            folder = root / "images" / split / ("horizontal", "vertical")[cls]
            folder.mkdir(parents=True)
            for i in range(n):
                stripes(cls, seed).save(folder / f"{i:03d}.png")
                seed += 1
    weights = calibrated_random_backbone(sorted((root / "images" / "train").rglob("*.png")), root / "calibrated.safetensors")
    store = root / "stripes.h5"
    embedstore.embed(root / "images", store, backbone=TINY_BACKBONE, weights=str(weights), space="frozen",
                     workers=0, progress=False)
    return store, weights


@pytest.fixture(scope="module")
def tuned(stripes_store: tuple[Path, Path]) -> dict:
    store, _ = stripes_store
    torch.use_deterministic_algorithms(True)
    try:
        # 8 epochs, patience 5: every seed 0-4 reached val accuracy >= 0.9 from a probe of 0.70-0.72
        return finetune(store, space="frozen", unfreeze=2, epochs=8, patience=5, lr=3e-3, batch_size=16, **FAST)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_finetuning_beats_the_frozen_probe(stripes_store: tuple[Path, Path], tuned: dict):
    store, _ = stripes_store
    assert tuned["finished"] and tuned["out_space"] == "frozen-ft" and tuned["val_source"] == "val"
    assert tuned["trained_stages"] == [g for g, _ in stage_groups(load_backbone(TINY_BACKBONE, "random").model)[-2:]]
    probe = tuned["frozen_probe_val_accuracy"]
    assert probe <= 0.8  # random features see the stripes only roughly
    # epoch 0 is the probe head on the frozen network, run on the images: the same classifier
    assert abs(tuned["history"][0]["val_accuracy"] - probe) <= 0.05
    assert tuned["best_epoch"] >= 1 and tuned["best_val_accuracy"] >= probe + 0.1

    from embedstore.heads import classify

    report = classify(str(store), models=["logreg"])  # both spaces side by side
    acc = {r["space"]: r["accuracy"] for r in report.results}
    assert set(acc) == {"frozen", "frozen-ft"}
    assert acc["frozen-ft"] >= acc["frozen"] + 0.08


@pytest.mark.slow
def test_frozen_stages_are_untouched_and_trained_ones_changed(stripes_store: tuple[Path, Path], tuned: dict):
    _, parent_weights = stripes_store
    before = load_file(str(parent_weights))
    after = load_file(tuned["backbone_weights"])
    assert before.keys() == after.keys()
    groups = stage_groups(load_backbone(TINY_BACKBONE, "random").model)
    trained = {n for _, names in groups[-2:] for n in names}
    for name in before:
        same = torch.equal(before[name], after[name])
        if name in trained:
            assert not same, f"{name} was trained but did not change"
        else:  # frozen parameters and every batch-norm statistic (train_bn=False) bit for bit
            assert same, f"{name} is frozen but changed"


@pytest.mark.slow
def test_new_space_records_lineage_and_reloads(stripes_store: tuple[Path, Path], tuned: dict):
    store, _ = stripes_store
    st = embedstore.open_store(store)
    parent, new = st.space("frozen"), st.space("frozen-ft")
    a = new.attrs
    assert a["parent_space"] == "frozen" and a["parent_weights_sha256"] == parent.attrs["weights_sha256"]
    assert a["weights"] == tuned["backbone_weights"] and Path(a["weights"]).is_absolute()
    assert a["weights_sha256"] == tuned["weights_sha256"] != parent.attrs["weights_sha256"]
    ft = a["finetune"]
    assert ft["checkpoint_sha256"] == sha256_file(a["weights"]) and ft["method"] == "LP-FT"
    assert (ft["unfreeze"], ft["epochs"], ft["lr"], ft["batch_size"]) == (2, 8, 3e-3, 16)
    assert ft["best_epoch"] == tuned["best_epoch"] and ft["classes"] == ["horizontal", "vertical"]
    assert len(new) == len(parent) == st.n_images == 140 and new.dim == parent.dim
    assert np.array_equal(new.rows, parent.rows) and not np.allclose(new.vectors, parent.vectors, atol=1e-2)
    bb = load_space_backbone(a)  # what index/search/predict use to embed queries in this space
    assert bb.weights_sha256 == a["weights_sha256"]


@pytest.mark.slow
def test_a_stopped_run_resumes_into_the_same_weights(tmp_path: Path, tiny_store: Path):
    a, b = tmp_path / "a" / "s.h5", tmp_path / "b" / "s.h5"
    for copy in (a, b):
        copy.parent.mkdir()
        shutil.copy(tiny_store, copy)
    opts = dict(out_space="r", unfreeze=1, epochs=2, lr=3e-3, batch_size=8, train_bn=True, **FAST)
    torch.use_deterministic_algorithms(True)
    try:
        whole = finetune(a, **opts)
        part = finetune(b, stop_after=1, **opts)
        assert not part["finished"] and part["epochs_run"] == 1 and "r" not in embedstore.open_store(b).spaces
        group = click.Group()
        register(group)
        runner = CliRunner()
        args = ["finetune", str(b), "--out-space", "r", "--unfreeze", "1", "--epochs", "2", "--lr", "0.003",
                "--batch-size", "8", "--train-bn", "--precision", "fp32", "--workers", "0"]
        other = runner.invoke(group, args + ["--lr", "0.01"])  # other settings: refused, not mixed in
        assert other.exit_code == 1 and "--restart" in other.output and "lr: 0.003 there, 0.01 now" in other.output
        res = runner.invoke(group, args + ["--json"], catch_exceptions=False)
    finally:
        torch.use_deterministic_algorithms(False)
    assert res.exit_code == 0, res.output
    resumed = json.loads(res.output)
    assert resumed["resumed_from_epoch"] == 1 and resumed["finished"] and resumed["epochs_run"] == 2
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"])
    last_a, last_b = (load_file(str(Path(r["checkpoint_dir"]) / "epoch-002.safetensors")) for r in (whole, resumed))
    assert last_a.keys() == last_b.keys()
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)  # bit for bit the uninterrupted run
    assert resumed["best_epoch"] == whole["best_epoch"] and resumed["weights_sha256"] == whole["weights_sha256"]
    np.testing.assert_array_equal(embedstore.open_store(a).space("r").vectors,
                                  embedstore.open_store(b).space("r").vectors)
    # with train_bn, batch norm of the trained stage updates its statistics; frozen ones keep theirs
    model = load_backbone(TINY_BACKBONE, "random").model
    before = model.state_dict()
    trained = set(stage_groups(model)[-1][1])
    for name in (n for n in before if n.endswith("running_mean")):
        module = name.rsplit(".", 1)[0]
        assert torch.equal(before[name], last_b[f"backbone.{name}"]) != (f"{module}.weight" in trained), name


def test_clear_errors(tmp_path: Path):
    make_collection(tmp_path / "flat", per_class=3, splits=())
    store = tmp_path / "flat.h5"
    embedstore.embed(tmp_path / "flat", store, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
    with pytest.raises(EmbedstoreError, match=r"flat\.h5 has no labelled images in a 'train' split.*FOLDER/train"):
        finetune(store, **FAST)
    with pytest.raises(ValueError, match="unfreeze must be 1..6"):
        make_collection(tmp_path / "split", per_class=2)
        split = tmp_path / "split.h5"
        embedstore.embed(tmp_path / "split", split, backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
        finetune(split, unfreeze=9, **FAST)
    group = click.Group()
    register(group)
    res = CliRunner().invoke(group, ["finetune", str(store), "--quiet"])
    assert res.exit_code == 1 and "train' split" in res.output and "Traceback" not in res.output


def test_config_is_checked_whole_and_recorded_from_one_place(tmp_path: Path, tiny_store: Path):
    """FinetuneConfig refuses bad settings at once (FinetuneError, a ValueError); finetune takes a config,
    keyword overrides, or both; state.json records exactly the config's run settings."""
    from embedstore.errors import FinetuneError
    from embedstore.finetuning import FinetuneConfig
    from embedstore.finetuning.config import RUN_KEYS

    for bad in ({"epochs": 0}, {"seed": -1}, {"seed": True}, {"hflip": 1.5}, {"lr": 0.0}, {"stop_after": 0},
                {"batch_size": 2.5}, {"warmup": 2.0}):
        with pytest.raises(FinetuneError, match=next(iter(bad))) as info:
            FinetuneConfig(**bad)
        assert isinstance(info.value, ValueError)
    with pytest.raises(FinetuneError, match="unknown fine-tune setting.*epochz"):
        finetune(tiny_store, epochz=1)
    with pytest.raises(FinetuneError, match="config must be a FinetuneConfig"):
        finetune(tiny_store, {"epochs": 1})
    config = FinetuneConfig(out_space="t", unfreeze=1, epochs=3, lr=3e-3, batch_size=8, stop_after=2, **FAST)
    s = finetune(tiny_store, config, stop_after=1)  # an override replaces the config's value
    assert s["epochs_run"] == 1 and not s["finished"] and s["unfreeze"] == 1
    state = json.loads((Path(s["checkpoint_dir"]) / "state.json").read_text())
    parent = embedstore.open_store(tiny_store).space(s["space"])
    assert state["settings"] == config.run_settings(parent.name, parent.attrs.get("weights_sha256"))
    assert tuple(state["settings"]) == RUN_KEYS and state["settings"]["epochs"] == 3
    with pytest.raises(FinetuneError, match="other settings.*lr: 0.003 there, 0.001 now"):
        finetune(tiny_store, config, lr=1e-3)
