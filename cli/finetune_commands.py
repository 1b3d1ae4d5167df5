"""``embedstore finetune``: partially unfreeze a space's backbone, train briefly, re-embed into a new space.

Wire into the main group with ``register(main)``.
"""
from __future__ import annotations

import click

from embedstore_cli.friendly import emit_json, friendly, workers_option


@click.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--space", default=None, help="Frozen space to start from. Default: the store's first frozen space.")
@click.option("--unfreeze", default=2, show_default=True, type=click.IntRange(1),
              help="Number of the backbone's last stages to train (timm's block grouping).")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1), help="Most epochs (early stopping may end sooner).")
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Peak learning rate of the head; stage k below gets lr * layer-decay^k.")
@click.option("--layer-decay", default=0.7, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Learning-rate factor per stage going down the network.")
@click.option("--weight-decay", default=0.05, show_default=True, type=click.FloatRange(0), help="AdamW weight decay.")
@click.option("--patience", default=3, show_default=True, type=click.IntRange(1),
              help="Stop after this many epochs without a better val accuracy.")
@click.option("--train-bn", is_flag=True,
              help="Batch norm of the trained stages uses batch statistics and updates its running ones "
                   "(default: every BN layer keeps its statistics; its scale and shift still train).")
@click.option("--hflip", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Probability of a horizontal flip in training; 0 for digits, text and other images a mirror changes.")
@click.option("--crop-scale", default=0.25, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Smallest share of the image area a random training crop keeps.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Training images per step.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="auto: bf16 autocast on AMX/AVX512-BF16 CPUs, bf16/fp16 on GPU.")
@click.option("--workers", default="auto", show_default=True, callback=workers_option, metavar="auto|N",
              help="Decode worker processes for training (0: in this process). auto: 1 when there are 2+ cores.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of data order, augmentation and held-out part.")
@click.option("--out-space", default=None, help="Name of the new space. Default: <space>-ft.")
@click.option("--restart", is_flag=True, help="Ignore an existing checkpoint and train from the start.")
@click.option("--stop-after", default=None, type=click.IntRange(1),
              help="Stop after this many epochs in total (resumable: run again without it to go on).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly
def finetune(store: str, space: str | None, unfreeze: int, epochs: int, lr: float, layer_decay: float,
             weight_decay: float, patience: int, train_bn: bool, hflip: float, crop_scale: float, batch_size: int,
             device: str, precision: str, workers: int | None,
             seed: int, out_space: str | None, restart: bool, stop_after: int | None, as_json: bool,
             quiet: bool) -> None:
    """Fine-tune the last stages of a space's backbone on STORE's train split, then re-embed.

    \b
    A new linear head starts from a logistic regression on the cached vectors (LP-FT); the last
    --unfreeze stages and the head train with AdamW, layer-wise lr decay, warm-up + cosine,
    timm's training augmentation and early stopping on val. Frozen stages keep eval-mode batch
    norm. A checkpoint is written every epoch to STORE.finetune/<out-space>/; a killed run
    resumes from it. The best epoch's backbone re-embeds every image into a new space
    (its attrs record the parent space, the checkpoint's sha256 and the training settings):
      embedstore classify STORE      # frozen and fine-tuned spaces side by side
    """
    from embedstore.finetuning import FinetuneConfig
    from embedstore.finetuning import finetune as run
    from embedstore_cli.main import _table

    config = FinetuneConfig(space=space, out_space=out_space, unfreeze=unfreeze, epochs=epochs, lr=lr,
                            batch_size=batch_size, layer_decay=layer_decay, weight_decay=weight_decay,
                            patience=patience, train_bn=train_bn, hflip=hflip, crop_scale=crop_scale,
                            seed=seed, device=device, precision=precision, workers=workers, restart=restart,
                            stop_after=stop_after, progress=not quiet and not as_json)
    s = run(store, config)
    if as_json:
        emit_json(s)
        return
    click.echo(f"{store}: fine-tuned {s['space']} ({', '.join(s['trained_stages'])} + head; {s['trainable_parameters']:,} "
               f"parameters) on {s['train']} train images, {s['device']} {s['precision']}"
               + (f", resumed after epoch {s['resumed_from_epoch']}" if s["resumed_from_epoch"] is not None else ""))
    rows = [[h["epoch"], "-" if h["train_loss"] is None else f"{h['train_loss']:.4f}", f"{h['val_accuracy']:.4f}",
             f"{h['val_loss']:.4f}", f"{h['seconds']:.1f}"] for h in s["history"]]
    click.echo(_table(rows, ["epoch", "train_loss", "val_acc", "val_loss", "seconds"]))
    click.echo(f"frozen probe: {s['frozen_probe_val_accuracy']:.4f}; best: epoch {s['best_epoch']} "
               f"({s['best_val_accuracy']:.4f}) in {s['seconds']:.1f}s")
    if not s["finished"]:
        click.echo(f"stopped after epoch {s['epochs_run']}; run the same command again to resume "
                   f"(checkpoint in {s['checkpoint_dir']})")
        return
    click.echo(f"space {s['out_space']}: {s['embedded']} embedded, {s['failed']} failed of {s['images']} images "
               f"(weights {s['backbone_weights']})")
    click.echo(f"compare: embedstore classify {store} --space {s['space']} --space {s['out_space']}")


def register(group: click.Group) -> None:
    """Add ``finetune`` to a click group (the ``embedstore`` command)."""
    group.add_command(finetune)
