"""``finetune``: partially unfreeze a space's backbone, train it briefly, re-embed the collection.

1. linear probe: a logistic regression on the space's cached train vectors initialises a new
   linear head (LP-FT, Kumar et al., ICLR 2022), so fine-tuning starts from the frozen optimum;
2. train the last N stages plus the head on augmented train images: AdamW, layer-wise
   learning-rate decay, warm-up + cosine schedule, autocast (bf16/fp16), early stopping on val;
   frozen stages stay in eval mode (batch-norm statistics untouched);
3. checkpoint every epoch under ``FILE.h5.finetune/<out-space>/`` (atomic; a rerun resumes);
4. save the best epoch's backbone (no head) as ``backbone.safetensors`` and re-embed every image
   of the store into ``out-space``, whose attrs record the parent space and the training run.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from . import training as T
from ..backbones.load import load_backbone, load_space_backbone, weights_checksum
from ..data.reader import ImageItem, draft_size
from ..embedding.embedder import Embedder, iter_embeddings, resolve_device, resolve_precision
from ..errors import EmbedstoreError, InvalidNameError
from ..store.integrity import validate_space_name
from ..pipeline.run import plan
from ..store.store import Batch, Space, Store, StoreWriter, open_store

# settings that define a run: a checkpoint only resumes a run with the same ones
RUN_KEYS = ("space", "unfreeze", "epochs", "lr", "batch_size", "layer_decay", "weight_decay", "patience",
            "warmup", "train_bn", "hflip", "crop_scale", "seed", "parent_weights_sha256")


def finetune(
    store: str | os.PathLike,
    *,
    space: str | None = None,
    unfreeze: int = 2,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    out_space: str | None = None,
    layer_decay: float = 0.7,
    weight_decay: float = 0.05,
    patience: int = 3,
    warmup: float = 0.1,
    train_bn: bool = False,
    hflip: float = 0.5,
    crop_scale: float = 0.25,
    seed: int = 0,
    workers: int | None = None,
    restart: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the last stages of a space's backbone on the store's train split, then re-embed.

    Args:
        store: the ``.h5`` store; its images need labels and a ``train`` split (``val`` for early
            stopping; without one, 20% of train per class is held out).
        space: the frozen space to start from (default: the store's first frozen space).
        unfreeze: number of the backbone's last stages to train (timm's coarse block grouping).
        epochs: most epochs to train (early stopping may end sooner).
        lr: peak learning rate of the new head; stage k below the head gets ``lr * layer_decay**k``.
        batch_size: training images per step (also the re-embedding batch).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        precision: ``auto`` (bf16 on CPUs that have it, bf16/fp16 on GPU), ``fp32``, ``bf16``, ``fp16``.
        out_space: name of the new space (default ``<space>-ft``).
        layer_decay: learning-rate factor per stage going down the network.
        weight_decay: AdamW weight decay (not on biases and norm parameters).
        patience: stop after this many epochs without a better val accuracy (ties: lower val loss).
        warmup: fraction of the steps with a linear learning-rate warm-up before the cosine decay.
        train_bn: let batch norm in the unfrozen stages use batch statistics and update its running
            statistics (default: every BN layer keeps its running statistics; its scale and shift train).
        hflip: probability of a horizontal flip in training (0 for digits, text, or anything a
            mirror changes).
        crop_scale: smallest share of the image area a training crop keeps (RandomResizedCrop).
        seed: seed of the data order, augmentation and held-out part; the run is reproducible.
        workers: image-decoding worker processes (default: from the device and cores).
        restart: ignore an existing checkpoint of ``out_space`` and train from the start.
        stop_after: stop (resumably, without re-embedding) once this many epochs have run.
        progress: progress bars on stderr.

    Returns a JSON-ready summary: epochs run, per-epoch history, best epoch and val accuracy, the
    frozen probe's val accuracy, seconds (total, training, re-embedding), the out space and its files.
    """
    t0 = time.perf_counter()
    store_path = Path(store)
    st = open_store(store_path)
    parent = st.space(space)
    if out_space is None and not _is_valid_name(f"{parent.name}-ft"):
        raise InvalidNameError(f"space {parent.name!r} gives no valid default name for the new space: "
                               "pass --out-space NAME (letters, digits, . _ + -)")
    out_space = validate_space_name(f"{parent.name}-ft" if out_space is None else out_space)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
    if out_space == parent.name:
        raise ValueError(f"out_space must differ from the parent space {parent.name!r}: pass --out-space NAME")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("patience", patience, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, not {value}")
    if not (0 <= hflip <= 1 and 0 < crop_scale <= 1):
        raise ValueError(f"hflip must be in [0, 1] and crop_scale in (0, 1], not {hflip} and {crop_scale}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    workers = (1 if len(os.sched_getaffinity(0)) > 1 else 0) if workers is None else workers
    folder = Path(f"{store_path}.finetune") / out_space
    if folder.resolve().parent != Path(f"{store_path}.finetune").resolve():  # checkpoints (and their clean-up)
        raise InvalidNameError(f"--out-space {out_space!r} would put checkpoints outside {store_path}.finetune/: "
                               "choose another name")
    settings = {"space": parent.name, "unfreeze": unfreeze, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                "layer_decay": layer_decay, "weight_decay": weight_decay, "patience": patience, "warmup": warmup,
                "train_bn": train_bn, "hflip": hflip, "crop_scale": crop_scale, "seed": seed,
                "parent_weights_sha256": parent.attrs.get("weights_sha256")}

    classes, train, val, val_note = _split(st, parent, seed)
    codes = {c: i for i, c in enumerate(classes)}
    probe = _linear_probe(parent, train, val, codes, seed)

    bb = load_space_backbone(parent.attrs)
    head = T.ProbeHead(probe["mean"], probe["scale"], probe["weight"], probe["bias"])
    trained, frozen = T.unfreeze_last(bb.model, unfreeze)
    net = T.Network(bb.model, head, bb.data_config, prec).to(dev, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(T.param_groups(bb.model, head, lr, layer_decay, weight_decay))
    scaler = torch.amp.GradScaler(dev.type) if prec == "fp16" else None

    state = None if restart else T.read_state(folder)
    if state is not None:
        changed = {k: (state["settings"].get(k), settings[k]) for k in RUN_KEYS if state["settings"].get(k) != settings[k]}
        if changed:
            raise EmbedstoreError(
                f"{folder} holds a checkpoint of a run with other settings ("
                + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
                + "): pass --restart (restart=True) to train again, or another --out-space NAME")
        T.load_net_weights(net, folder / state["weights"], state["weights_sha256"])
        T.load_optimizer(folder / state["optimizer"], optimizer, scaler)
    elif out_space in st.spaces:
        raise EmbedstoreError(f"{store_path} already has a space {out_space!r} (an earlier run whose checkpoint "
                              f"{folder} is gone or being restarted): pass another --out-space NAME")
    resumed_from = state["epoch"] if state else None

    train_items, val_items = [_item(st, p, lab, s) for p, lab, s in train], [_item(st, p, lab, s) for p, lab, s in val]
    y_train = np.array([codes[lab] for _, lab, _ in train])
    y_val = np.array([codes[lab] for _, lab, _ in val])
    side = draft_size(bb.data_config)
    val_batches = T.loader(val_items, bb.eval_transform(), batch_size, workers, side)
    steps_per_epoch = len(train_items) // batch_size if len(train_items) > batch_size else 1
    total = steps_per_epoch * epochs
    warmup_steps = int(round(warmup * total))

    if state is None:  # epoch 0: the linear probe on the frozen network, seen through the images
        te = time.perf_counter()
        acc, loss = T.evaluate(net, val_batches, y_val)
        state = {"settings": settings, "classes": classes, "step": 0, "done": False, "history": [
            {"epoch": 0, "train_loss": None, "val_accuracy": round(acc, 4), "val_loss": round(loss, 4),
             "seconds": round(time.perf_counter() - te, 2)}],
            "best": {"epoch": 0, "val_accuracy": acc, "val_loss": loss}}
        T.save_checkpoint(folder, 0, net, optimizer, scaler, state)
    epoch = state["epoch"]
    while not state["done"] and (stop_after is None or epoch < stop_after):
        epoch += 1
        te = time.perf_counter()
        gen = T.seed_everything(seed * 100_003 + epoch)
        augment = T.train_transform(bb.data_config, hflip, crop_scale)
        batches = T.loader(train_items, augment, batch_size, workers, 2 * side, gen)
        state["step"], train_loss, _ = T.train_epoch(net, batches, y_train, optimizer, scaler, state["step"], total,
                                                     warmup_steps, f"finetune {out_space} epoch {epoch}/{epochs}",
                                                     progress, train_bn)
        acc, loss = T.evaluate(net, val_batches, y_val)
        best = state["best"]
        if acc > best["val_accuracy"] or (acc == best["val_accuracy"] and loss < best["val_loss"]):
            state["best"] = {"epoch": epoch, "val_accuracy": acc, "val_loss": loss}
        state["history"].append({"epoch": epoch, "train_loss": round(train_loss, 4), "val_accuracy": round(acc, 4),
                                 "val_loss": round(loss, 4), "seconds": round(time.perf_counter() - te, 2)})
        state["done"] = epoch >= epochs or epoch - state["best"]["epoch"] >= patience
        T.save_checkpoint(folder, epoch, net, optimizer, scaler, state)
        if progress:
            print(f"epoch {epoch}/{epochs}: train loss {train_loss:.4f}, val accuracy {acc:.4f}, val loss {loss:.4f}",
                  file=sys.stderr)

    summary: dict[str, Any] = {
        "store": str(store_path), "space": parent.name, "out_space": out_space, "device": dev.type,
        "precision": prec, "classes": len(classes), "train": len(train), "val": len(val), "val_source": val_note,
        "unfreeze": unfreeze, "trained_stages": trained, "frozen_stages": frozen,
        "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "frozen_probe_val_accuracy": round(probe["val_accuracy"], 4), "probe_C": probe["C"],
        "epochs_run": epoch, "resumed_from_epoch": resumed_from, "stopped_early": state["done"] and epoch < epochs,
        "best_epoch": state["best"]["epoch"], "best_val_accuracy": round(state["best"]["val_accuracy"], 4),
        "train_seconds": round(sum(h["seconds"] for h in state["history"]), 2),
        "history": state["history"], "checkpoint_dir": str(folder.resolve()), "finished": state["done"],
    }
    if state["done"]:
        T.load_net_weights(net, folder / f"epoch-{state['best']['epoch']:03d}.safetensors")
        t_embed = time.perf_counter()
        summary.update(_publish(store_path, st, parent, out_space, folder, bb, net, state, settings, summary,
                                device, precision, batch_size, workers, progress))
        summary["embed_seconds"] = round(time.perf_counter() - t_embed, 2)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _is_valid_name(name: str) -> bool:
    try:
        validate_space_name(name)
    except InvalidNameError:
        return False
    return True


def _split(st: Store, sp: Space, seed: int) -> tuple[list[str], list[tuple], list[tuple], str]:
    """(classes, train rows, val rows, where val came from); rows are (path, label, split)."""
    labelled = [(p, lab, s) for p, lab, s in zip(sp.paths, sp.labels, sp.splits) if lab]
    train = [r for r in labelled if r[2] == "train"]
    if not train:
        raise EmbedstoreError(
            f"{st.path} has no labelled images in a 'train' split (space {sp.name!r}): fine-tuning needs one. "
            "Lay the collection out as FOLDER/train/<class>/img and FOLDER/val/<class>/img, or embed a CSV list "
            "with path,label,split rows, and run `embedstore embed` again")
    classes = sorted({r[1] for r in train})
    if len(classes) < 2:
        raise EmbedstoreError(f"{st.path}: the train split has only one class ({classes[0]!r}); fine-tuning needs two or more")
    for name in ("val", "test"):
        val = [r for r in labelled if r[2] == name and r[1] in classes]
        if val:
            return classes, train, val, name
    rng = np.random.default_rng(seed)
    held = set()
    for c in classes:
        idx = [i for i, r in enumerate(train) if r[1] == c]
        held.update(rng.permutation(idx)[: max(1, len(idx) // 5)].tolist() if len(idx) > 1 else [])
    return (classes, [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held],
            "20% of train (the store has no val split)")


def _item(st: Store, path: str, label: str, split: str) -> ImageItem:
    return ImageItem(st.abspath(path), path, label, split)


def _linear_probe(sp: Space, train: list[tuple], val: list[tuple], codes: dict[str, int], seed: int) -> dict[str, Any]:
    """L2 normalisation, standardisation and a logistic regression on the cached train vectors (C by 3-fold CV)."""
    index = {p: i for i, p in enumerate(sp.paths)}
    X = _unit(sp.vectors[[index[p] for p, _, _ in train]])
    Xv = _unit(sp.vectors[[index[p] for p, _, _ in val]])
    y = np.array([codes[lab] for _, lab, _ in train])
    yv = np.array([codes[lab] for _, lab, _ in val])
    scaler = StandardScaler().fit(X)
    Z, Zv = scaler.transform(X), scaler.transform(Xv)
    folds = min(3, int(np.bincount(y).min()))
    best_c, best = 1.0, -1.0
    if folds >= 2:
        for c in (0.01, 0.1, 1.0, 10.0):
            accs = [LogisticRegression(C=c, max_iter=2000).fit(Z[a], y[a]).score(Z[b], y[b])
                    for a, b in StratifiedKFold(folds, shuffle=True, random_state=seed).split(Z, y)]
            if np.mean(accs) > best + 1e-9:
                best_c, best = c, float(np.mean(accs))
    lr = LogisticRegression(C=best_c, max_iter=2000).fit(Z, y)
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; two logits with the same softmax
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return {"mean": scaler.mean_, "scale": scaler.scale_, "weight": coef, "bias": intercept, "C": best_c,
            "val_accuracy": float(lr.score(Zv, yv))}


def _unit(vectors: np.ndarray) -> np.ndarray:
    X = vectors.astype(np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _publish(store_path: Path, st: Store, parent: Space, out_space: str, folder: Path, bb: Any, net: T.Network,
             state: dict[str, Any], settings: dict[str, Any], summary: dict[str, Any], device: str, precision: str,
             batch_size: int, workers: int, progress: bool) -> dict[str, Any]:
    """Save the best backbone (no head), reload it the way any space is reloaded, re-embed into ``out_space``."""
    weights = folder / "backbone.safetensors"
    expected = weights_checksum(net.backbone)
    checkpoint_sha = T.save_weights(net.backbone.state_dict(), weights)
    fine = load_backbone(parent.attrs["backbone"], weights=str(weights.resolve()))
    if fine.weights_sha256 != expected:
        raise EmbedstoreError(f"{weights} does not reload to the trained weights (sha256 {fine.weights_sha256[:12]} "
                              f"!= {expected[:12]}): delete {folder} and run again")
    existing = st.spaces.get(out_space)
    if existing is not None and existing.attrs.get("weights_sha256") != fine.weights_sha256:
        raise EmbedstoreError(f"{store_path} already has a space {out_space!r} from other weights: "
                              "pass another --out-space NAME")
    embedder = Embedder(fine, device=device, precision=precision)
    attrs = {**fine.space_attrs(), "dtype": parent.attrs.get("dtype", "float16"), "precision": embedder.precision,
             "device": embedder.device.type, "parent_space": parent.name,
             "parent_weights_sha256": parent.attrs.get("weights_sha256"),
             "created": existing.attrs.get("created") if existing else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "finetune": {**{k: v for k, v in settings.items() if k != "space"}, "checkpoint": str(weights.resolve()),
                          "checkpoint_sha256": checkpoint_sha, "method": "LP-FT", "optimizer": "AdamW",
                          "schedule": "warmup+cosine", "training_precision": summary["precision"],
                          "trained_stages": summary["trained_stages"], "classes": state["classes"],
                          "train_images": summary["train"], "val_images": summary["val"],
                          "val_source": summary["val_source"], "epochs_run": summary["epochs_run"],
                          "best_epoch": state["best"]["epoch"], "best_val_accuracy": state["best"]["val_accuracy"],
                          "frozen_probe_val_accuracy": summary["frozen_probe_val_accuracy"]}}
    rows = [(p, lab, s) for p, lab, s in zip(st.images["path"], st.images["label"], st.images["split"])]
    items = [_item(st, *r) for r in rows]
    embedded = failed = 0
    with StoreWriter(store_path, root=st.root) as writer:
        todo, _, _ = plan(items, writer.snapshot(), out_space)
        bar = tqdm(total=len(todo), unit="img", desc=f"embed {out_space}", disable=not progress, file=sys.stderr)
        for results, vectors in iter_embeddings(todo, embedder, batch_size, workers):
            batch, k = Batch(), 0
            for r in results:
                it = todo[r.index]
                if r.error:
                    batch.add_failure(path=it.rel, space=out_space, error=r.error, message=r.message, size=r.size,
                                      mtime=r.mtime)
                    failed += 1
                else:
                    batch.add_image(vectors[k], path=it.rel, label=it.label, split=it.split, size=r.size,
                                    hash=r.hash, mtime=r.mtime)
                    k, embedded = k + 1, embedded + 1
            writer.commit(batch, out_space, attrs)
            bar.update(len(results))
        bar.close()
    return {"backbone_weights": str(weights.resolve()), "weights_sha256": fine.weights_sha256,
            "checkpoint_sha256": checkpoint_sha, "embedded": embedded, "failed": failed,
            "images": len(items)}
