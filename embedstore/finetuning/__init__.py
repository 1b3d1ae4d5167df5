"""The optional fine-tune stage: partially unfreeze a backbone, train with resumable checkpoints, re-embed."""
from __future__ import annotations

from .training import stage_groups, sha256_file
from .config import FinetuneConfig
from .run import finetune

__all__ = ['stage_groups', 'sha256_file', 'finetune', 'FinetuneConfig']
