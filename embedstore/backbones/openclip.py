"""CLIP-family backbones through open_clip: ``open_clip:ARCH`` (e.g. ``open_clip:ViT-B-32``), with their text tower.

The backbone's network is the whole CLIP model behind an image-side ``forward`` (:class:`ImageTower`):
a normalised image batch in, the projected image embedding out, the space the text embeddings
live in. The text side (:class:`TextTower`: the same model's ``encode_text`` and open_clip's
tokenizer, whose BPE vocabulary ships in the package) encodes text queries and class prompts;
since both towers are one module, the weights checksum of the space covers the text tower too.

Weights are never downloaded here: ``weights`` is a local checkpoint file, an open_clip pretrained
tag (``laion2b_s34b_b79k``) found in the local Hugging Face cache (or ``~/.cache/clip`` for tags
with a URL only), ``None`` for the first tag of ARCH that is in the cache, or ``"random"``.
open_clip is an optional extra (``pip install 'tl-embedstore[clip]'``): imported on first use.

Crash safety: reads weights only (from the path given or the local cache); writes nothing.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import BackboneError
from .registry import RANDOM

PREFIX = "open_clip:"  # backbone names, and the weights source recorded for a pretrained tag ("open_clip:TAG")
CLIP_CACHE = os.path.join("~", ".cache", "clip")  # where open_clip keeps checkpoints downloaded from a URL
_RESIZE_TO_CROP_MODE = {"shortest": "center", "squash": "squash", "longest": "border"}  # open_clip -> timm


class ImageTower(nn.Module):
    """A CLIP model as a backbone: ``forward`` is ``encode_image`` (projected, not normalised).

    The text tower rides along in the state dict, so the weights checksum covers both towers.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.clip.encode_image(images)
        return out[0] if isinstance(out, tuple) else out


class TextTower:
    """The text side of a loaded CLIP backbone: texts in, projected text embeddings out (not normalised).

    It runs on the device where the backbone's model is (an ``Embedder`` may have moved it), in float32.
    """

    def __init__(self, model: ImageTower, tokenizer: Callable[..., torch.Tensor], arch: str):
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """float32 (len(texts), dim) text embeddings; texts longer than the context are truncated."""
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[s:s + batch_size])).to(device)
            out.append(self.model.clip.encode_text(tokens).float().cpu().numpy())
        dim = int(getattr(self.model.clip, "embed_dim", 0) or 0)
        return np.concatenate(out) if out else np.empty((0, dim), np.float32)


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise BackboneError("open_clip: backbones need open-clip-torch: pip install 'tl-embedstore[clip]' "
                            "(or pip install open-clip-torch)") from e
    return open_clip


def _hint(arch: str) -> str:
    return (f"Download it into the Hugging Face cache on a machine with network (python -c \"import open_clip; "
            f"open_clip.create_model('{arch}', pretrained='TAG')\") and copy the cache (HF_HOME, by default "
            "~/.cache/huggingface) here, or pass --weights FILE (a local open_clip checkpoint of this architecture), "
            "or --weights random for an untrained network")


def _cached_file(tag_cfg: dict[str, Any]) -> str | None:
    """The local checkpoint of a pretrained tag: the Hugging Face cache (as open_clip names its files)
    or open_clip's URL download folder; None when it is not on this machine. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return str(tag_cfg["file"])
    if tag_cfg.get("hf_hub"):
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        for name in [*_get_safe_alternatives(filename), filename]:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if tag_cfg.get("url"):
        path = os.path.join(os.path.expanduser(CLIP_CACHE), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


class _DropRandomInitNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # "... Model initialized randomly.": asked for
        return "initialized randomly" not in record.getMessage()


def _create(oc: Any, arch: str, checkpoint: str | None, tag_cfg: dict[str, Any]) -> nn.Module:
    """open_clip.create_model of ``arch`` with ``checkpoint`` loaded (strict), or seeded random weights.

    A tag's preprocessing (mean, std, interpolation, resize mode) and QuickGELU flag are applied as
    open_clip applies them when it downloads the tag itself.
    """
    from open_clip.transform import PreprocessCfg

    keys = set(PreprocessCfg.__dataclass_fields__)
    quiet = _DropRandomInitNote()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return oc.create_model(
                arch, pretrained=checkpoint, pretrained_text=False, pretrained_image=False,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
                force_preprocess_cfg={k: v for k, v in tag_cfg.items() if k in keys} or None)
    finally:
        root.removeFilter(quiet)


def _resolve(oc: Any, arch: str, weights: str | None) -> tuple[str | None, dict[str, Any], str]:
    """(checkpoint file or None for random weights, the tag's config, the weights source to record)."""
    tags = oc.list_pretrained_tags_by_model(arch)
    if weights == RANDOM:
        return None, {}, RANDOM
    if weights is not None and os.path.isfile(weights):
        return weights, {}, os.path.abspath(weights)
    if weights is None:
        for tag in tags:
            cfg = oc.get_pretrained_cfg(arch, tag)
            path = _cached_file(cfg)
            if path:
                return path, cfg, PREFIX + tag
        raise BackboneError(
            f"no pretrained weights of {PREFIX}{arch} are in the local cache, and embedstore does not download: "
            f"pick a pretrained tag ({', '.join(tags) or 'open_clip lists none for this architecture'}). "
            + _hint(arch))
    if not oc.is_pretrained_cfg(arch, weights):
        raise BackboneError(
            f"--weights {weights!r} is neither a file nor an open_clip pretrained tag of {arch}: pass a checkpoint "
            f"file, 'random', or one of the tags {', '.join(tags) or '(none for this architecture)'}")
    cfg = oc.get_pretrained_cfg(arch, weights)
    path = _cached_file(cfg)
    if path is None:
        where = cfg.get("hf_hub") or cfg.get("url") or "?"
        raise BackboneError(
            f"the weights {PREFIX}{arch} {weights} ({where}) are not in the local cache, and embedstore does not "
            f"download them (offline). " + _hint(arch).replace("TAG", weights))
    return path, cfg, PREFIX + weights.lower().replace("-", "_")


def data_config(clip: nn.Module) -> dict[str, Any]:
    """timm's data config (what ``Backbone.eval_transform`` and the ``Embedder`` read) of open_clip's
    preprocessing: resize the shortest side and centre-crop (or squash / pad), mean and std."""
    from open_clip import get_model_preprocess_cfg

    pp = get_model_preprocess_cfg(clip)
    size = pp.get("size", getattr(clip.visual, "image_size", 224))
    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    return {
        "input_size": (3, int(h), int(w)),
        "interpolation": str(pp.get("interpolation", "bicubic")),
        "mean": tuple(float(m) for m in pp["mean"]),
        "std": tuple(float(s) for s in pp["std"]),
        "crop_pct": 1.0,
        "crop_mode": _RESIZE_TO_CROP_MODE.get(str(pp.get("resize_mode", "shortest")), "center"),
    }


def load_openclip(name: str, weights: str | None) -> tuple[ImageTower, dict[str, Any], str, dict[str, Any]]:
    """(model, timm-style data config, weights source, ``Backbone.extra``) of ``open_clip:ARCH``.

    ``extra`` holds the :class:`TextTower` (``"text_tower"``), the space attributes this backbone
    adds (``text_tower: True``, the architecture) and open_clip's version.
    """
    oc = _open_clip()
    arch = name[len(PREFIX):]
    if arch not in oc.list_models():
        raise BackboneError(f"unknown open_clip architecture {arch!r}: use a name from open_clip.list_models() "
                            "such as open_clip:ViT-B-32 (or register a config with open_clip.add_model_config)")
    checkpoint, tag_cfg, source = _resolve(oc, arch, weights)
    try:
        clip = _create(oc, arch, checkpoint, tag_cfg)
    except Exception as e:  # noqa: BLE001 - open_clip's loader errors become one message naming the file
        text = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if checkpoint is None:  # e.g. a Hugging Face text tower whose config is not in the offline cache
            raise BackboneError(f"cannot create {PREFIX}{arch} ({text}). " + _hint(arch)) from e
        raise BackboneError(f"cannot load {checkpoint} into {PREFIX}{arch} ({text}): pass a checkpoint saved from "
                            f"open_clip's {arch}, or the --backbone it was saved from") from None
    try:
        tokenizer = oc.get_tokenizer(arch)
    except Exception as e:  # noqa: BLE001 - an HF tokenizer missing from the offline cache
        raise BackboneError(f"the tokenizer of {PREFIX}{arch} cannot be loaded ({type(e).__name__}: {e}). "
                            + _hint(arch)) from e
    model = ImageTower(clip)
    extra = {
        "text_tower": TextTower(model, tokenizer, arch),
        "space_attrs": {"text_tower": True, "open_clip_arch": arch},
        "versions": {"open_clip": oc.__version__},
    }
    return model, data_config(clip), source, extra

