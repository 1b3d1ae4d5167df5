"""The fine-tune stage's last step: save the best backbone, reload it as any space is reloaded, re-embed the store.

Crash safety: ``backbone.safetensors`` is written atomically (temporary file, fsync, rename) and
checked to reload to the trained weights before anything is embedded; the new space's vectors go
through :class:`embedstore.store.StoreWriter`'s journalled commits, so a killed re-embedding
resumes where it stopped (:func:`embedstore.pipeline.run.plan` skips the rows already there).
"""
from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from . import training as T
from .config import Run
from ..backbones.load import load_backbone, weights_checksum
from ..data.reader import ImageItem
from ..embedding.embedder import Embedder, iter_embeddings
from ..errors import FinetuneError
from ..pipeline.plan import plan
from ..store import Batch, Store, StoreWriter


def item(st: Store, path: str, label: str, split: str) -> ImageItem:
    """The store's row ``path`` as an image to read."""
    return ImageItem(st.abspath(path), path, label, split)


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
    embedder = Embedder(fine, device=cfg.device, precision=cfg.precision)
    attrs = {**fine.space_attrs(), "dtype": parent.attrs.get("dtype", "float16"), "precision": embedder.precision,
             "device": embedder.device.type, "parent_space": parent.name,
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
    rows = [(p, lab, s) for p, lab, s in zip(st.images["path"], st.images["label"], st.images["split"])]
    items = [item(st, *r) for r in rows]
    embedded = failed = 0
    with StoreWriter(store_path, root=st.root) as writer:
        todo, _, _ = plan(items, writer.snapshot(), out_space)
        bar = tqdm(total=len(todo), unit="img", desc=f"embed {out_space}", disable=not cfg.progress, file=sys.stderr)
        for results, vectors in iter_embeddings(todo, embedder, cfg.batch_size, run.workers):
            batch, k = Batch(), 0
            for r in results:
                it = todo[r.index]
                if r.error:
                    batch.add_failure(path=it.rel, space=out_space, error=r.error, message=r.message, size=r.size,
                                      mtime=r.mtime)
                    failed += 1
                else:
                    batch.add_image(vectors[k], path=it.rel, label=it.label, split=it.split, size=r.size,
                                    hash=r.hash, mtime=r.mtime)
                    k, embedded = k + 1, embedded + 1
            writer.commit(batch, out_space, attrs)
            bar.update(len(results))
        bar.close()
    return {"backbone_weights": str(weights.resolve()), "weights_sha256": fine.weights_sha256,
            "checkpoint_sha256": checkpoint_sha, "embedded": embedded, "failed": failed,
            "images": len(items)}
