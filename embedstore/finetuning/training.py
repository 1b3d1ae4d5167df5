"""Building blocks of the fine-tune stage: stages to unfreeze, optimiser groups, one epoch, checkpoints.

Kept free of store logic so that each piece can be read and tested alone; ``run.py`` puts
them together.

Crash safety: every checkpoint file (weights, optimiser state, ``state.json``) is written by
:func:`embedstore._atomic.atomic_write` (temporary file, fsync, rename); ``state.json`` last, so it
always names complete files.
"""
from __future__ import annotations

import json
import math
import pickle
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from .._atomic import atomic_write, atomic_write_text
from .._hashing import sha256_file
from ..data import ImageItem, ImageReader, collate
from ..embedding import AUTOCAST_DTYPES
from ..errors import FinetuneError


# --------------------------------------------------------------------------- which layers train


def stage_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The model's parameters grouped into stages, input to output: ``[(label, [param names])]``.

    timm models use their own coarse grouping (``model.group_matcher(coarse=True)``: stem, each
    stage of blocks, the final conv/norm); other models (torchvision) fall back to their top-level
    children in registration order.
    """
    names = [n for n, _ in model.named_parameters()]
    if hasattr(model, "group_matcher"):
        grouped = timm.models.group_parameters(model, model.group_matcher(coarse=True))
        groups = [grouped[k] for k in sorted(grouped)]
    else:
        order: dict[str, list[str]] = {}
        for n in names:
            order.setdefault(n.split(".", 1)[0], []).append(n)
        groups = list(order.values())
    groups = [g for g in groups if g]
    heads = [n.split(".", 1)[0] for g in groups for n in g]
    shared = {h for h in heads if sum(any(n.split(".", 1)[0] == h for n in g) for g in groups) > 1}

    def label(group: list[str]) -> str:
        seen: dict[str, None] = {}
        for n in group:
            parts = n.split(".")
            seen[".".join(parts[:2]) if parts[0] in shared else parts[0]] = None
        return "+".join(seen)

    return [(label(g), g) for g in groups]


def unfreeze_last(model: nn.Module, n: int) -> tuple[list[str], list[str]]:
    """Freeze every parameter, then unfreeze the last ``n`` stages; returns (trained, frozen) stage labels."""
    groups = stage_groups(model)
    if not 1 <= n <= len(groups):
        raise FinetuneError(f"unfreeze must be 1..{len(groups)} (this backbone has {len(groups)} stages: "
                            f"{', '.join(g for g, _ in groups)}), not {n}")
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for _, names in groups[-n:]:
        for name in names:
            params[name].requires_grad_(True)
    return [g for g, _ in groups[-n:]], [g for g, _ in groups[:-n]]


def set_train_mode(model: nn.Module, train_bn: bool = False) -> None:
    """Train mode for the unfrozen part only: frozen layers (batch norm included) stay in eval mode.

    Batch norm in the unfrozen stages keeps its running statistics too unless ``train_bn``: its
    scale and shift still train, but the features the linear-probe head was fitted on stay exact
    at the start, and training computes the same function that evaluation and embedding use
    (with small batches and a few hundred steps, running statistics would not settle).
    """
    model.train()
    for module in model.modules():  # parents before children
        own = list(module.parameters(recurse=False))
        if own or list(module.buffers(recurse=False)):
            if not any(p.requires_grad for p in own):
                module.training = False
        elif next(module.parameters(), None) is not None and not any(p.requires_grad for p in module.parameters()):
            module.train(False)  # a wholly frozen subtree, parameter-free children included
    if not train_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.training = False


def param_groups(model: nn.Module, head: nn.Module, lr: float, layer_decay: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise learning-rate decay over stages (head: ``lr``; k-th stage below: ``lr * decay**k``).

    Biases and norm parameters (1-D) get no weight decay, as in timm's ``param_groups_layer_decay``.
    """
    out: list[dict[str, Any]] = []

    def add(params: list[nn.Parameter], scale: float) -> None:
        for decay, ps in ((weight_decay, [p for p in params if p.ndim > 1]), (0.0, [p for p in params if p.ndim <= 1])):
            if ps:
                out.append({"params": ps, "lr": lr * scale, "base_lr": lr * scale, "lr_scale": scale,
                            "weight_decay": decay})

    add(list(head.parameters()), 1.0)
    params = dict(model.named_parameters())
    trained = [names for _, names in stage_groups(model) if params[names[0]].requires_grad]
    for depth, names in enumerate(reversed(trained), start=1):
        add([params[n] for n in names], layer_decay ** depth)
    return out


def cosine_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- data and one epoch


def train_transform(data_config: dict[str, Any], hflip: float = 0.5, crop_scale: float = 0.25) -> Any:
    """timm's training augmentation for a space's recorded data config, stopping at uint8 (normalised on device).

    RandomResizedCrop keeping ``crop_scale``-1 of the area (default 0.25, milder than ImageNet's
    0.08 for a few epochs on small sets), horizontal flip with probability ``hflip`` (0 for
    text, digits and other images that flipping changes) and colour jitter 0.4.
    """
    return timm.data.create_transform(
        input_size=tuple(data_config["input_size"]), is_training=True, interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), scale=(crop_scale, 1.0), hflip=hflip,
        normalize=False)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (augmentation in the main process, dropout); return a loader generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def loader(items: Sequence[ImageItem], transform: Any, batch_size: int, workers: int, min_size: int | None,
           generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """Batches of (read results, uint8 images); shuffled (and the last short batch dropped) when a generator is given."""
    shuffle = generator is not None
    return torch.utils.data.DataLoader(
        ImageReader(items, transform, min_size), batch_size=batch_size, shuffle=shuffle, generator=generator,
        drop_last=shuffle and len(items) > batch_size, num_workers=workers, collate_fn=collate,
        prefetch_factor=2 if workers else None)


class ProbeHead(nn.Module):
    """The new classifier: features L2-normalised, standardised with fixed train statistics, then a linear layer.

    Keeping the standardisation outside the trained weights gives the optimiser well-scaled
    coordinates whatever the feature scale of the backbone.
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        unit = nn.functional.normalize(features.float(), dim=1, eps=1e-12)
        return self.linear((unit - self.mean) / self.scale)


class Network(nn.Module):
    """Backbone plus linear head, fed uint8 images (normalised here, channels-last, under autocast)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, data_config: dict[str, Any], precision: str):
        super().__init__()
        self.backbone, self.head, self.precision = backbone, head, precision
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES.get(self.precision), enabled=self.precision != "fp32"):
            features = self.backbone(x)
        return self.head(features.float())


def _targets(results: list[Any], codes: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(codes[[r.index for r in results if not r.error]], device=device)


def train_epoch(net: Network, batches: torch.utils.data.DataLoader, codes: np.ndarray, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler | None, step: int, total: int, warmup: int, desc: str,
                progress: bool, train_bn: bool = False) -> tuple[int, float, int]:
    """One pass over the training images; returns (next step, mean loss, images seen)."""
    device = net.mean.device
    set_train_mode(net.backbone, train_bn)
    net.head.train()
    loss_sum, seen = 0.0, 0
    bar = tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=not progress, leave=False)
    for results, images in bar:
        if images is None:
            continue
        factor = cosine_factor(step, total, warmup)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        y = _targets(results, codes, device)
        loss = nn.functional.cross_entropy(net(images.to(device, non_blocking=True)), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        step += 1
        loss_sum += float(loss.detach()) * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    bar.close()
    return step, loss_sum / max(1, seen), seen


@torch.inference_mode()
def evaluate(net: Network, batches: torch.utils.data.DataLoader, codes: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode; unreadable images count as wrong."""
    net.eval()
    device = net.mean.device
    correct, loss_sum = 0, 0.0
    for results, images in batches:
        if images is None:
            continue
        y = _targets(results, codes, device)
        logits = net(images.to(device))
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    n = len(codes)
    return correct / n, loss_sum / n


# --------------------------------------------------------------------------- checkpoints


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write a .safetensors file atomically (temporary file, fsync, rename); return its sha256."""
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))
    return sha256_file(path)


def save_checkpoint(folder: Path, epoch: int, net: Network, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, state: dict[str, Any]) -> None:
    """Epoch checkpoint: weights (.safetensors), optimiser state (.pt), then ``state.json`` naming both.

    ``state`` (settings, history, best epoch) is updated in place with the file names and checksums.

    ``state.json`` is replaced last, so it always points at complete files; files of epochs that
    are neither the latest nor the best are deleted afterwards.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"epoch-{epoch:03d}"
    weights_sha = save_weights({f"backbone.{k}": v for k, v in net.backbone.state_dict().items()}
                               | {f"head.{k}": v for k, v in net.head.state_dict().items()}, folder / f"{stem}.safetensors")
    atomic_write(folder / f"{stem}.pt", lambda tmp: torch.save(
        {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None}, tmp))
    state.update(epoch=epoch, weights=f"{stem}.safetensors", weights_sha256=weights_sha, optimizer=f"{stem}.pt",
                 optimizer_sha256=sha256_file(folder / f"{stem}.pt"))
    atomic_write_text(folder / "state.json", json.dumps(state, indent=2))
    keep = {f"{stem}.safetensors", f"{stem}.pt", f"epoch-{state['best']['epoch']:03d}.safetensors"}
    for old in folder.glob("epoch-*"):  # only this run's own files: folder is STORE.finetune/<out-space>
        if old.name not in keep and old.is_file():
            old.unlink(missing_ok=True)


# what ``state.json`` must hold to resume from it (``optimizer_sha256`` is absent in older checkpoints)
STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "settings": dict, "classes": list, "step": int, "done": bool, "history": list, "best": dict, "epoch": int,
    "weights": str, "weights_sha256": str, "optimizer": str}
# what a damaged checkpoint file can raise while it is read (truncated zip or pickle, wrong tensors, wrong keys)
LOAD_ERRORS = (SafetensorError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError)


def damaged(path: Path, what: str) -> FinetuneError:
    """The error for a checkpoint file that cannot be resumed from, naming it and the two ways out."""
    return FinetuneError(f"checkpoint {path} {what}: pass --restart (restart=True) to train again from the start, "
                         f"or delete the folder {path.parent}")


def read_state(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's ``state.json``, checked to be resumable; None when the folder holds none."""
    path = folder / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise damaged(path, f"is not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise damaged(path, f"holds a JSON {type(state).__name__}, not an object")
    missing = [k for k in STATE_KEYS if k not in state]
    wrong = [k for k, t in STATE_KEYS.items() if k in state and not isinstance(state[k], t)]
    best = state.get("best")
    if isinstance(best, dict) and not (isinstance(best.get("epoch"), int)
                                       and all(isinstance(best.get(k), (int, float)) for k in ("val_accuracy", "val_loss"))):
        wrong.append("best")
    wrong += [k for k in ("weights", "optimizer") if k not in wrong and k in state
              and (Path(state[k]).name != state[k] or state[k] in ("", ".", ".."))]  # a file of this folder only
    if missing or wrong:
        raise damaged(path, "is incomplete or damaged (" + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"bad {', '.join(wrong)}"] if wrong else [])) + ")")
    return state


def _check_file(path: Path, expected_sha256: str | None) -> None:
    if not path.is_file():
        raise damaged(path, "is missing (named by state.json)")
    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise FinetuneError(f"checkpoint {path} does not match its checksum in state.json (damaged?): "
                            f"delete its folder {path.parent} or pass --restart to train again")


def load_net_weights(net: Network, path: Path, expected_sha256: str | None = None) -> None:
    """Load an epoch's backbone and head weights, refusing a missing or damaged file (or one whose checksum differs)."""
    _check_file(path, expected_sha256)
    try:
        tensors = load_file(str(path))
        net.backbone.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")})
        net.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    except LOAD_ERRORS as e:
        raise damaged(path, f"cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   expected_sha256: str | None = None) -> None:
    """Load an epoch's optimiser (and fp16 scaler) state, refusing a missing or damaged file."""
    _check_file(path, expected_sha256)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
    except LOAD_ERRORS as e:
        raise damaged(path, f"cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from None
