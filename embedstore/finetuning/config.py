"""The settings of one fine-tune run: a frozen, checked ``FinetuneConfig`` carried whole through the stage, and ``Run``.

Crash safety: a value object; nothing is written. The settings that define a run (:data:`RUN_KEYS`)
are recorded in the checkpoint's ``state.json`` and in the new space's lineage from one place,
:meth:`FinetuneConfig.run_settings`.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import FinetuneError
from ..store import Space, Store

if TYPE_CHECKING:
    import torch

# settings that define a run: a checkpoint only resumes a run with the same ones
RUN_KEYS = ("space", "unfreeze", "epochs", "lr", "batch_size", "layer_decay", "weight_decay", "patience",
            "warmup", "train_bn", "hflip", "crop_scale", "seed", "parent_weights_sha256")


@dataclass(frozen=True)
class FinetuneConfig:
    """What :func:`embedstore.finetuning.finetune` does; see its docstring for each field.

    Training settings (recorded, a resumed run must match them): ``unfreeze``, ``epochs``, ``lr``,
    ``batch_size``, ``layer_decay``, ``weight_decay``, ``patience``, ``warmup``, ``train_bn``,
    ``hflip``, ``crop_scale``, ``seed``. Where: ``space`` (parent, default the store's first) and
    ``out_space`` (default ``<space>-ft``). How it runs (not recorded): ``device``, ``precision``,
    ``workers``, ``restart``, ``stop_after``, ``progress``.
    """

    space: str | None = None
    out_space: str | None = None
    unfreeze: int = 2
    epochs: int = 5
    lr: float = 1e-4
    batch_size: int = 32
    layer_decay: float = 0.7
    weight_decay: float = 0.05
    patience: int = 3
    warmup: float = 0.1
    train_bn: bool = False
    hflip: float = 0.5
    crop_scale: float = 0.25
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    restart: bool = False
    stop_after: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise FinetuneError(f"seed must be a non-negative integer, not {self.seed!r}")
        for name in ("unfreeze", "epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise FinetuneError(f"{name} must be at least 1, not {value!r}")
        for name in ("stop_after", "workers"):
            value, low = getattr(self, name), 1 if name == "stop_after" else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low):
                raise FinetuneError(f"{name} must be None or a whole number >= {low}, not {value!r}")
        if not (0 <= self.hflip <= 1 and 0 < self.crop_scale <= 1):
            raise FinetuneError(f"hflip must be in [0, 1] and crop_scale in (0, 1], not {self.hflip} and "
                                f"{self.crop_scale}")
        if not (self.lr > 0 and 0 < self.layer_decay <= 1 and self.weight_decay >= 0 and 0 <= self.warmup <= 1):
            raise FinetuneError(f"lr must be > 0, layer_decay in (0, 1], weight_decay >= 0 and warmup in [0, 1], "
                                f"not {self.lr}, {self.layer_decay}, {self.weight_decay} and {self.warmup}")

    @classmethod
    def build(cls, config: FinetuneConfig | None = None, overrides: Mapping[str, Any] | None = None) -> FinetuneConfig:
        """``config`` (default: the defaults) with ``overrides`` applied; an unknown name is a :class:`FinetuneError`."""
        config = cls() if config is None else config
        if not isinstance(config, cls):
            raise FinetuneError(f"config must be a FinetuneConfig, not {type(config).__name__}")
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise FinetuneError(f"unknown fine-tune setting(s) {', '.join(unknown)}: choose from "
                                + ", ".join(f.name for f in dataclasses.fields(cls)))
        return dataclasses.replace(config, **overrides) if overrides else config

    def run_settings(self, parent: str, parent_weights_sha256: str | None) -> dict[str, Any]:
        """The :data:`RUN_KEYS` of this run from the parent space it starts from: what a checkpoint must match."""
        values = {"space": parent, "parent_weights_sha256": parent_weights_sha256}
        return {k: values[k] if k in values else getattr(self, k) for k in RUN_KEYS}


@dataclass
class Run:
    """Where a run reads and writes, and the settings it records (from :meth:`FinetuneConfig.run_settings`)."""

    cfg: FinetuneConfig
    store_path: Path
    st: Store
    parent: Space
    out_space: str
    folder: Path
    device: "torch.device"
    precision: str
    workers: int
    settings: dict[str, Any]
