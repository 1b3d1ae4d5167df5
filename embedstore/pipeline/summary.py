"""The summary of an ``embed`` run: one frozen record for local, shard and Ray runs, returned as a dict.

Crash safety: a plain value; nothing is written.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class RunSummary:
    """What a run did. ``extra`` holds the keys of a shard run (shard, shard_file, shard_skipped)
    or of a Ray run (engine, shards, workers, per_shard, ...); :meth:`to_dict` flattens them in."""

    store: str
    space: str
    backbone: str
    weights: str | None
    device: str
    precision: str
    images: int
    embedded: int = 0
    unchanged: int = 0
    failed: int = 0
    known_failures: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    runtime: str = ""  # "torch 2.4.1 bf16", "onnxruntime 1.18.0" (embedding.runtimes)
    notes: tuple[str, ...] = ()  # what the run wants said: the runtime chosen by auto, a refused runtime
    stages: Mapping[str, float] = field(default_factory=dict)
    skipped_extra: int = 0  # skipped for another reason than a plan (a finished shard's images)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return self.unchanged + self.known_failures + self.skipped_extra

    def to_dict(self) -> dict[str, Any]:
        """The summary dict that ``embed`` returns and ``embedstore embed --json`` prints."""
        d = asdict(self)
        extra = d.pop("extra")
        d.pop("skipped_extra")
        out: dict[str, Any] = {}
        for k, v in d.items():
            out[k] = v
            if k == "embedded":  # the key order of the summary printed by `embedstore embed --json`
                out["skipped"] = self.skipped
        out["seconds"] = round(self.seconds, 3)
        out["stages"] = {k: round(v, 3) for k, v in self.stages.items()}
        out["notes"] = list(self.notes)
        return {**out, **extra}


def rate(images: int, seconds: float) -> float:
    """Images per second, 0.0 when nothing ran."""
    return round(images / seconds, 2) if seconds > 0 and images else 0.0
