"""The optional fine-tune stage: partially unfreeze a backbone, train with resumable checkpoints, re-embed.

Crash safety: every checkpoint file is written atomically and ``state.json`` last, so a killed run
resumes from its last complete epoch; the re-embedding goes through the store's journalled commits
(:mod:`.run`, :mod:`.training`, :mod:`.publish`).
"""
from __future__ import annotations

from .._hashing import sha256_file
from .training import stage_groups
from .config import FinetuneConfig
from .run import finetune

__all__ = ['stage_groups', 'sha256_file', 'finetune', 'FinetuneConfig']
