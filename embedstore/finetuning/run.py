"""``finetune``: partially unfreeze a space's backbone, train it briefly, re-embed the collection.

1. linear probe: a logistic regression on the space's cached train vectors initialises a new
   linear head (LP-FT, Kumar et al., ICLR 2022), so fine-tuning starts from the frozen optimum;
2. train the last N stages plus the head on augmented train images: AdamW, layer-wise
   learning-rate decay, warm-up + cosine schedule, autocast (bf16/fp16), early stopping on val;
   frozen stages stay in eval mode (batch-norm statistics untouched);
3. checkpoint every epoch under ``FILE.h5.finetune/<out-space>/`` (atomic; a rerun resumes);
4. save the best epoch's backbone (no head) as ``backbone.safetensors`` and re-embed every image
   of the store into ``out-space``, whose attrs record the parent space and the training run.

Crash safety: every checkpoint is written atomically and ``state.json`` last
(:mod:`embedstore.finetuning.training`); a killed run resumes from the last complete epoch, and a
killed re-embedding resumes where it stopped (:mod:`embedstore.finetuning.publish`).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import training as T
from .config import RUN_KEYS, FinetuneConfig, Run
from .probe import SplitRows, linear_probe, split_rows
from .publish import items_of, publish
from ..backbones.load import load_space_backbone
from ..data.reader import draft_size
from ..embedding.embedder import resolve_device, resolve_precision
from ..errors import FinetuneError, InvalidNameError
from ..store import open_store, validate_space_name
from ..utils import cpu_cores


@dataclass
class Model:
    """The network being trained with its optimiser, and the data it trains on."""

    bb: Any
    net: T.Network
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    trained: list[str]
    frozen: list[str]
    classes: list[str]
    train: SplitRows  # iterates as (path, label, split) tuples
    val: SplitRows
    val_note: str
    probe: dict[str, Any]


def finetune(store: str | os.PathLike, config: FinetuneConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Fine-tune the last stages of a space's backbone on the store's train split, then re-embed.

    Args:
        store: the ``.h5`` store; its images need labels and a ``train`` split (``val`` for early
            stopping; without one, 20% of train per class is held out).
        config: the run's settings (default: :class:`FinetuneConfig`'s defaults).
        **overrides: fields of :class:`FinetuneConfig` to change, e.g. ``epochs=3, lr=3e-4``:
            space (frozen space to start from, default the store's first), unfreeze (number of the
            backbone's last stages to train, timm's coarse grouping), epochs (most epochs; early
            stopping may end sooner), lr (peak learning rate of the new head; stage k below gets
            ``lr * layer_decay**k``), batch_size (also the re-embedding batch), device (``auto``,
            ``cpu``, ``cuda[:N]``), precision (``auto``, ``fp32``, ``bf16``, ``fp16``), out_space (default
            ``<space>-ft``), layer_decay, weight_decay (AdamW; not on biases and norms), patience
            (epochs without a better val accuracy before stopping; ties: lower val loss), warmup
            (fraction of steps with linear warm-up before the cosine decay), train_bn (batch norm of the
            unfrozen stages uses batch statistics), hflip (flip probability; 0 for digits and text),
            crop_scale (smallest area share of a RandomResizedCrop), seed (data order, augmentation,
            held-out part), workers (decoding processes), restart (ignore an existing checkpoint),
            stop_after (stop resumably, without re-embedding, after this many epochs), progress.

    Returns a JSON-ready summary: epochs run, per-epoch history, best epoch and val accuracy, the
    frozen probe's val accuracy, seconds (total, training, re-embedding), the out space and its files.
    """
    t0 = time.perf_counter()
    run = _open(Path(store), FinetuneConfig.build(config, overrides))
    model = _model(run)
    state, resumed_from = _resume(run, model)
    state, epoch = _train(run, model, state)
    summary = _summary(run, model, state, epoch, resumed_from)
    if state["done"]:
        T.load_net_weights(model.net, run.folder / f"epoch-{state['best']['epoch']:03d}.safetensors")
        t_embed = time.perf_counter()
        summary.update(publish(run, model.net, state, summary))
        summary["embed_seconds"] = round(time.perf_counter() - t_embed, 2)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _open(store_path: Path, cfg: FinetuneConfig) -> Run:
    """Open the store and the parent space; check the out space's name and where its checkpoints go."""
    st = open_store(store_path)
    parent = st.space(cfg.space)
    if str(parent.attrs.get("backbone", "")).startswith("open_clip:"):  # its stages would be the whole CLIP model
        raise FinetuneError(f"space {parent.name!r} is a CLIP space ({parent.attrs['backbone']}): fine-tuning "
                            "open_clip: backbones is not supported (training the image tower alone would move it "
                            "away from its text tower); compare the frozen heads with `embedstore classify` instead")
    if cfg.out_space is not None:
        out_space = validate_space_name(cfg.out_space)
    else:
        try:
            out_space = validate_space_name(f"{parent.name}-ft")
        except InvalidNameError:
            raise InvalidNameError(f"space {parent.name!r} gives no valid default name for the new space: "
                                   "pass --out-space NAME (letters, digits, . _ + -)") from None
    if out_space == parent.name:
        raise FinetuneError(f"out_space must differ from the parent space {parent.name!r}: pass --out-space NAME")
    dev = resolve_device(cfg.device)
    workers = (1 if cpu_cores() > 1 else 0) if cfg.workers is None else cfg.workers
    folder = Path(f"{store_path}.finetune") / out_space
    if folder.resolve().parent != Path(f"{store_path}.finetune").resolve():  # checkpoints (and their clean-up)
        raise InvalidNameError(f"--out-space {out_space!r} would put checkpoints outside {store_path}.finetune/: "
                               "choose another name")
    return Run(cfg, store_path, st, parent, out_space, folder, dev, resolve_precision(cfg.precision, dev), workers,
               cfg.run_settings(parent.name, parent.attrs.get("weights_sha256")))


def _model(run: Run) -> Model:
    """Split the rows, fit the linear probe on the cached vectors (the split's rows only), and build the
    network it starts."""
    cfg = run.cfg
    classes, train, val, val_note = split_rows(run.st, run.parent, cfg.seed)
    probe = linear_probe(run.parent, train, val, {c: i for i, c in enumerate(classes)}, cfg.seed)
    bb = load_space_backbone(run.parent.attrs)
    head = T.ProbeHead(probe["mean"], probe["scale"], probe["weight"], probe["bias"])
    trained, frozen = T.unfreeze_last(bb.model, cfg.unfreeze)
    net = T.Network(bb.model, head, bb.data_config, run.precision).to(run.device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(T.param_groups(bb.model, head, cfg.lr, cfg.layer_decay, cfg.weight_decay))
    scaler = torch.amp.GradScaler(run.device.type) if run.precision == "fp16" else None
    return Model(bb, net, optimizer, scaler, trained, frozen, classes, train, val, val_note, probe)


def _resume(run: Run, model: Model) -> tuple[dict[str, Any] | None, int | None]:
    """The checkpoint state to go on from (weights and optimiser loaded), or None to start; and its epoch."""
    state = None if run.cfg.restart else T.read_state(run.folder)
    if state is not None:
        changed = {k: (state["settings"].get(k), run.settings[k]) for k in RUN_KEYS
                   if state["settings"].get(k) != run.settings[k]}
        if changed:
            raise FinetuneError(
                f"{run.folder} holds a checkpoint of a run with other settings ("
                + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
                + "): pass --restart (restart=True) to train again, or another --out-space NAME")
        T.load_net_weights(model.net, run.folder / state["weights"], state["weights_sha256"])
        T.load_optimizer(run.folder / state["optimizer"], model.optimizer, model.scaler, state.get("optimizer_sha256"))
    elif run.out_space in run.st.spaces:
        raise FinetuneError(f"{run.store_path} already has a space {run.out_space!r} (an earlier run whose checkpoint "
                            f"{run.folder} is gone or being restarted): pass another --out-space NAME")
    return state, state["epoch"] if state else None


def _train(run: Run, model: Model, state: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
    """Epoch 0 (the probe through the frozen network) when starting, then epochs until done or ``stop_after``."""
    cfg, net = run.cfg, model.net
    codes = {c: i for i, c in enumerate(model.classes)}
    train_items = items_of(run.st, model.train)
    y_train = np.array([codes[lab] for _, lab, _ in model.train])
    y_val = np.array([codes[lab] for _, lab, _ in model.val])
    side = draft_size(model.bb.data_config)
    val_batches = T.loader(items_of(run.st, model.val), model.bb.eval_transform(), cfg.batch_size,
                           run.workers, side)
    total = (len(train_items) // cfg.batch_size if len(train_items) > cfg.batch_size else 1) * cfg.epochs
    warmup_steps = int(round(cfg.warmup * total))
    if state is None:
        te = time.perf_counter()
        acc, loss = T.evaluate(net, val_batches, y_val)
        state = {"settings": run.settings, "classes": model.classes, "step": 0, "done": False, "history": [
            {"epoch": 0, "train_loss": None, "val_accuracy": round(acc, 4), "val_loss": round(loss, 4),
             "seconds": round(time.perf_counter() - te, 2)}],
            "best": {"epoch": 0, "val_accuracy": acc, "val_loss": loss}}
        T.save_checkpoint(run.folder, 0, net, model.optimizer, model.scaler, state)
    epoch = state["epoch"]
    while not state["done"] and (cfg.stop_after is None or epoch < cfg.stop_after):
        epoch += 1
        te = time.perf_counter()
        gen = T.seed_everything(cfg.seed * 100_003 + epoch)
        augment = T.train_transform(model.bb.data_config, cfg.hflip, cfg.crop_scale)
        batches = T.loader(train_items, augment, cfg.batch_size, run.workers, 2 * side, gen)
        state["step"], train_loss, _ = T.train_epoch(
            net, batches, y_train, model.optimizer, model.scaler, state["step"], total, warmup_steps,
            f"finetune {run.out_space} epoch {epoch}/{cfg.epochs}", cfg.progress, cfg.train_bn)
        acc, loss = T.evaluate(net, val_batches, y_val)
        best = state["best"]
        if acc > best["val_accuracy"] or (acc == best["val_accuracy"] and loss < best["val_loss"]):
            state["best"] = {"epoch": epoch, "val_accuracy": acc, "val_loss": loss}
        state["history"].append({"epoch": epoch, "train_loss": round(train_loss, 4), "val_accuracy": round(acc, 4),
                                 "val_loss": round(loss, 4), "seconds": round(time.perf_counter() - te, 2)})
        state["done"] = epoch >= cfg.epochs or epoch - state["best"]["epoch"] >= cfg.patience
        T.save_checkpoint(run.folder, epoch, net, model.optimizer, model.scaler, state)
        if cfg.progress:
            print(f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val accuracy {acc:.4f}, "
                  f"val loss {loss:.4f}", file=sys.stderr)
    return state, epoch


def _summary(run: Run, model: Model, state: dict[str, Any], epoch: int, resumed_from: int | None) -> dict[str, Any]:
    return {
        "store": str(run.store_path), "space": run.parent.name, "out_space": run.out_space,
        "device": run.device.type, "precision": run.precision, "classes": len(model.classes),
        "train": len(model.train), "val": len(model.val), "val_source": model.val_note,
        "unfreeze": run.cfg.unfreeze, "trained_stages": model.trained, "frozen_stages": model.frozen,
        "trainable_parameters": sum(p.numel() for p in model.net.parameters() if p.requires_grad),
        "frozen_probe_val_accuracy": round(model.probe["val_accuracy"], 4), "probe_C": model.probe["C"],
        "epochs_run": epoch, "resumed_from_epoch": resumed_from,
        "stopped_early": state["done"] and epoch < run.cfg.epochs,
        "best_epoch": state["best"]["epoch"], "best_val_accuracy": round(state["best"]["val_accuracy"], 4),
        "train_seconds": round(sum(h["seconds"] for h in state["history"]), 2),
        "history": state["history"], "checkpoint_dir": str(run.folder.resolve()), "finished": state["done"],
    }
