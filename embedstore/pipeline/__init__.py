"""Collection to store: plan what is new, run the batch loop locally, by shards, or on Ray, and merge shards."""
from __future__ import annotations

from .run import embed, plan
from .distributed import merge, embed_ray, parse_shard, shard_of, select_shard, shard_file, shards_dir, published_shards, unfinished_shards, build_ivf_on_disk, search_ivf_on_disk

__all__ = ['embed', 'plan', 'merge', 'embed_ray', 'parse_shard', 'shard_of', 'select_shard', 'shard_file', 'shards_dir', 'published_shards', 'unfinished_shards', 'build_ivf_on_disk', 'search_ivf_on_disk']
