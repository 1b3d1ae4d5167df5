"""Collection to store: plan what is new, run the batch loop locally, by shards, or on Ray, and merge shards.

Crash safety: every batch is a durable journal part before the next is read, and a shard appears by one
rename when complete, so a run or merge killed at any point resumes with nothing lost or duplicated.
"""
from __future__ import annotations

from .run import embed
from .plan import plan
from .merge import merge
from .importer import add_vectors, import_vectors
from .exporter import export_vectors
from .ray_runner import embed_ray
from .shards import parse_shard, shard_of, select_shard, shard_file, shards_dir, published_shards, unfinished_shards

__all__ = ['embed', 'plan', 'merge', 'add_vectors', 'import_vectors', 'export_vectors', 'embed_ray', 'parse_shard', 'shard_of', 'select_shard', 'shard_file', 'shards_dir', 'published_shards', 'unfinished_shards']
