"""The fine-tune stage's last step: save the best backbone, reload it as any space is reloaded, re-embed the store.

Crash safety: ``backbone.safetensors`` is written atomically (temporary file, fsync, rename) and
checked to reload to the trained weights before anything is embedded; the new space's vectors go
through :class:`embedstore.store.StoreWriter`'s journalled commits, so a killed re-embedding
resumes where it stopped (:func:`embedstore.pipeline.run.plan` skips the rows already there).

Re-embedding touches every image, so every path is read, but ``REEMBED_ROWS`` rows at a time
(path, label and split of those rows only, planned and embedded before the next are read): memory
follows one chunk, not the collection. No vector of the store is read here.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from . import training as T
from .config import Run
from ..backbones.load import load_backbone, weights_checksum
from ..data.collection import MAX_FILE_BYTES
from ..data.reader import ImageItem
from ..data.remote import Fetch
from ..data.stored import stored_items
from ..embedding.embedder import Embedder
from ..embedding.runtimes import load_embedder
from ..errors import FinetuneError
from ..pipeline.plan import plan
from ..pipeline.worker import embed_batches, runtime_attrs
from ..store import Store, StoreWriter

REEMBED_ROWS = 65536  # store rows listed, planned and embedded at a time


def items_of(st: Store, rows: Sequence[tuple[str, str, str]], fetch: Fetch | None = None) -> list[ImageItem]:
    """The store's (path, label, split) rows as images to read: files, tar members, URLs (:func:`stored_items`)."""
    paths, labels, splits = zip(*rows) if rows else ((), (), ())
    return stored_items(st.root, paths, labels=labels, splits=splits, fetch=fetch or Fetch())


def store_items(st: Store, chunk: int = REEMBED_ROWS) -> Iterator[list[ImageItem]]:
    """Every image of the store as items to read (files, tar members, URLs: :func:`stored_items`),
    ``chunk`` rows at a time in row order: the path, label and split columns are read for those rows
    only (never a whole column)."""
    fetch = Fetch()
    for a in range(0, st.n_images, chunk):
        rows = np.arange(a, min(st.n_images, a + chunk))
        paths, labels, splits = (st.image_column(c, rows) for c in ("path", "label", "split"))
        yield stored_items(st.root, paths, labels=labels, splits=splits, fetch=fetch)


def reembed(st: Store, store_path: Any, out_space: str, embedder: Embedder, attrs: dict[str, Any], *,
            batch_size: int, workers: int | None, progress: bool, chunk: int = REEMBED_ROWS) -> dict[str, int]:
    """Embed every image of ``st`` into ``out_space`` of the store at ``store_path``, ``chunk`` rows at a
    time; rows the space already holds unchanged are skipped (a killed run resumes). Returns
    ``{"embedded", "failed", "images"}``."""
    embedded = failed = 0
    with StoreWriter(store_path, root=st.root) as writer:
        snapshot = writer.snapshot()
        with tqdm(total=st.n_images, unit="img", desc=f"embed {out_space}", disable=not progress,
                  file=sys.stderr) as bar:
            for items in store_items(st, chunk):
                todo, _, _ = plan(items, snapshot, out_space)
                bar.update(len(items) - len(todo))  # already there
                if todo:
                    done, bad = embed_batches(todo, embedder, writer, out_space, attrs, batch_size=batch_size,
                                              workers=workers, max_bytes=MAX_FILE_BYTES, progress=progress, bar=bar)
                    embedded, failed = embedded + done, failed + bad
    return {"embedded": embedded, "failed": failed, "images": st.n_images}


def publish(run: Run, net: T.Network, state: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Save the best backbone (no head), reload it the way any space is reloaded, re-embed into ``run.out_space``.

    ``state`` is the checkpoint state (classes, best epoch), ``summary`` the run's summary so far;
    returns the summary's publishing fields (weights, checksums, images embedded and failed).
    """
    store_path, st, parent, out_space, folder = run.store_path, run.st, run.parent, run.out_space, run.folder
    cfg = run.cfg
    weights = folder / "backbone.safetensors"
    expected = weights_checksum(net.backbone)
    checkpoint_sha = T.save_weights(net.backbone.state_dict(), weights)
    fine = load_backbone(parent.attrs["backbone"], weights=str(weights.resolve()))
    if fine.weights_sha256 != expected:
        raise FinetuneError(f"{weights} does not reload to the trained weights (sha256 {fine.weights_sha256[:12]} "
                            f"!= {expected[:12]}): delete {folder} and run again")
    existing = st.spaces.get(out_space)
    if existing is not None and existing.attrs.get("weights_sha256") != fine.weights_sha256:
        raise FinetuneError(f"{store_path} already has a space {out_space!r} from other weights: "
                            "pass another --out-space NAME")
    # training stays in torch; re-embedding may use an exported runtime (auto: validated, probed for large stores)
    embedder = load_embedder(fine, "auto", cfg.device, cfg.precision, items=next(store_items(st, 64), []),
                             images=st.n_images, batch_size=cfg.batch_size)
    attrs = {**fine.space_attrs(), "dtype": parent.attrs.get("dtype", "float16"), "precision": embedder.precision,
             "device": embedder.device.type, **runtime_attrs(embedder), "parent_space": parent.name,
             "parent_weights_sha256": parent.attrs.get("weights_sha256"),
             "created": existing.attrs.get("created") if existing else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "finetune": {**{k: v for k, v in run.settings.items() if k != "space"}, "checkpoint": str(weights.resolve()),
                          "checkpoint_sha256": checkpoint_sha, "method": "LP-FT", "optimizer": "AdamW",
                          "schedule": "warmup+cosine", "training_precision": summary["precision"],
                          "trained_stages": summary["trained_stages"], "classes": state["classes"],
                          "train_images": summary["train"], "val_images": summary["val"],
                          "val_source": summary["val_source"], "epochs_run": summary["epochs_run"],
                          "best_epoch": state["best"]["epoch"], "best_val_accuracy": state["best"]["val_accuracy"],
                          "frozen_probe_val_accuracy": summary["frozen_probe_val_accuracy"]}}
    counts = reembed(st, store_path, out_space, embedder, attrs, batch_size=cfg.batch_size, workers=run.workers,
                     progress=cfg.progress)
    return {"backbone_weights": str(weights.resolve()), "weights_sha256": fine.weights_sha256,
            "checkpoint_sha256": checkpoint_sha, "reembed_runtime": embedder.runtime,
            "reembed_notes": list(embedder.notes), **counts}
