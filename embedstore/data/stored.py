"""Images a store names, read back by the stages after embedding (report thumbnails, the fine-tune stage).

A store keeps each image's key: a path relative to the collection root (or absolute), a tar member
(``<shard key>/<member name>``), a URL, or a Hugging Face dataset row's key. :func:`stored_items`
turns keys back into :class:`~.items.ImageItem`s the reader reads: a file is a file; a member is
found through its shard's header listing (each shard listed once per call, no member extracted); a
URL is fetched by :class:`~.remote.Fetch` (``fetch``), or left unread when ``fetch`` is None; a
dataset row cannot be read without its dataset and comes back as a missing file. What cannot be
read becomes the reader's recorded failure, as in the embedding run.

Crash safety: reads only (tar headers); writes nothing.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Sequence

from .items import ImageItem, is_url
from .remote import Fetch, file_url_path
from .tars import is_shard, list_shard

_SHARD_IN_KEY = re.compile(r"\.tar/", re.IGNORECASE)
NOT_FETCHED = "a URL, not fetched here (only local files and tar members are read back)"


def stored_items(root: str, keys: Sequence[str], *, labels: Sequence[str] | None = None,
                 splits: Sequence[str] | None = None, fetch: Fetch | None = None) -> list[ImageItem]:
    """One readable item per stored key (with its label and split), in order. ``fetch``: how URLs are
    read; None leaves them unread (the item is refused: the reader records :data:`NOT_FETCHED`)."""
    shards: dict[str, dict[str, ImageItem]] = {}  # shard key -> member key -> item: one listing per shard
    out = []
    for i, key in enumerate(keys):
        key = str(key)
        label = str(labels[i]) if labels is not None else ""
        split = str(splits[i]) if splits is not None else ""
        out.append(_item(root, key, label, split, shards, fetch))
    return out


def _item(root: str, key: str, label: str, split: str, shards: dict[str, dict[str, ImageItem]],
          fetch: Fetch | None) -> ImageItem:
    if is_url(key):
        if key.lower().startswith("file://"):
            return ImageItem(file_url_path(key), key, label, split)
        if fetch is None:
            return ImageItem(key, key, label, split, refusal=NOT_FETCHED)
        return ImageItem(key, key, label, split, source=fetch)
    path = key if os.path.isabs(key) or not root else os.path.join(root, key)
    if not os.path.exists(path):
        for m in _SHARD_IN_KEY.finditer(key):
            shard_key = key[:m.start() + 4]
            shard_path = shard_key if os.path.isabs(shard_key) or not root else os.path.join(root, shard_key)
            if is_shard(shard_key) and os.path.isfile(shard_path):
                if shard_key not in shards:
                    shards[shard_key] = {it.rel: it for it in list_shard(shard_path, shard_key)}
                member = shards[shard_key].get(key)
                if member is not None:
                    return replace(member, label=label or member.label, split=split or member.split)
    return ImageItem(path, key, label, split)  # a file, or missing: the reader says which

