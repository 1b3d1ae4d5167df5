"""``embedstore classify`` and ``embedstore predict``: classical heads over a store's vectors.

Wire into the main group with ``register(main)``.
"""
from __future__ import annotations

import itertools
import json
import os
import textwrap
from typing import Any, Iterator

import click

from embedstore.choices import HEADS as DEFAULT_MODELS, PREPROCESS, PROTOCOLS, TEXT_HEADS
from embedstore_cli.friendly import emit_json, friendly


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def _default_png(store: str, space: str, model: str) -> str:
    base = os.path.splitext(store)[0]
    return f"{base}.{space}.{model}.confusion.png"


@click.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--space", "spaces", multiple=True, help="Space to use; repeat to compare spaces. Default: every space.")
@click.option("--models", default="all", show_default=True,
              help=f"Comma list of heads ({', '.join(DEFAULT_MODELS + TEXT_HEADS)}), or 'all': every head, "
                   "zeroshot only on spaces embedded with an open_clip: backbone.")
@click.option("--protocol", default="auto", show_default=True, type=click.Choice(PROTOCOLS),
              help="split: train on train, score on val/test; cv: stratified k-fold; "
                   "auto: split when the store has splits.")
@click.option("--preprocess", default="l2", show_default=True, type=click.Choice(PREPROCESS),
              help="Vector preprocessing, fitted on training rows.")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2), help="Folds of the cv protocol.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the validation carve and the folds (>= 0).")
@click.option("--confusion", "confusion_png", default=None, type=click.Path(dir_okay=False),
              help="Confusion-matrix PNG of the best head. Default: STORE.<space>.<model>.confusion.png.")
@click.option("--no-confusion", is_flag=True, help="Do not write the confusion-matrix picture.")
@click.option("--save-head", "save_dir", default=None, type=click.Path(file_okay=False),
              help="Save the best head with its space's lineage to this folder (for `embedstore predict`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def classify(store: str, spaces: tuple[str, ...], models: str, protocol: str, preprocess: str, folds: int, seed: int,
             confusion_png: str | None, no_confusion: bool, save_dir: str | None, as_json: bool) -> None:
    """Compare classifier heads on the cached vectors of STORE (every model x space).

    \b
    Heads: logreg, linear-svm, rbf-svm, ridge (C or alpha swept), knn (FAISS cosine,
    DINOv2 softmax vote, k and T swept), knn-majority, centroid. Hyper-parameters are
    chosen on a part carved from the training rows only; scores come from val/test
    (split protocol) or out-of-fold predictions (cv).
    On a space embedded with a CLIP backbone (--backbone open_clip:ARCH), zeroshot is
    compared too: no labelled image, only the class names as prompts ("a photo of a
    {label}.") encoded by its text tower, to show what the labels buy.
    """
    from embedstore.heads import classify as run
    from embedstore.heads import parse_models, write_confusion_png
    from embedstore_cli.main import _table

    names = None if models.strip() == "all" else parse_models(models)  # None: zeroshot too, on text spaces
    report = run(store, spaces=list(spaces) or None, models=names, protocol=protocol, preprocess=preprocess,
                 folds=folds, seed=seed)
    out = report.to_dict()
    best = report.best
    if not no_confusion:
        png = confusion_png or _default_png(store, best["space"], best["model"])
        try:
            out["best"]["confusion_png"] = write_confusion_png(
                png, best["confusion_matrix"], best["labels"], f"{best['space']} / {best['model']}: "
                f"accuracy {best['accuracy']:.3f}")
        except OSError as e:
            click.echo(f"warning: cannot write {png} ({e}); pass --confusion PATH", err=True)
    if save_dir:
        out["head"] = report.save_head(save_dir)
    if as_json:
        emit_json(out)
        return
    ev = report.evaluation
    if report.protocol == "split":
        click.echo(f"{store}: trained on {ev['train']} train images, scored on {ev['eval']} {ev['eval_split']} images"
                   + (f" (and {ev['test']} test)" if "test" in ev else ""))
    else:
        click.echo(f"{store}: {ev['folds']}-fold stratified cross-validation over {ev['eval']} labelled images")
    top5 = any("top5_accuracy" in r for r in report.results)
    test = any("test" in r for r in report.results)
    header = ["space", "model", "acc", "bal_acc", "macro_f1"] + (["top5"] if top5 else []) + \
        (["test_acc"] if test else []) + ["fit_s", "predict_s", "params"]
    rows = []
    for r in report.results:
        rows.append([r["space"], r["model"], f"{r['accuracy']:.4f}", f"{r['balanced_accuracy']:.4f}",
                     f"{r['macro_f1']:.4f}"]
                    + ([f"{r.get('top5_accuracy', float('nan')):.4f}"] if top5 else [])
                    + ([f"{r['test']['accuracy']:.4f}"] if test else [])
                    + [f"{r['fit_s']:.3f}", f"{r['predict_s']:.4f}", _fmt_params(r["params"])])
    click.echo(_table(rows, header))
    click.echo(f"\nbest: {best['space']} / {best['model']} ({best['accuracy']:.4f} accuracy)\n")
    click.echo(best["per_class_text"].rstrip())
    if "confusion_png" in out["best"]:
        click.echo(f"\nconfusion matrix: {out['best']['confusion_png']}")
    if save_dir:
        click.echo(f"head saved to {out['head']}; use it with: embedstore predict {out['head']} IMAGES...")


@click.command()
@click.argument("head", type=click.Path(exists=True))
@click.argument("images", nargs=-1, type=click.Path(exists=True))
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1), help="Labels shown per image.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--keep-going", is_flag=True,
              help="Label the readable images and list each unreadable one as a failure (exit 0); "
                   "by default an unreadable image is an error (exit 1).")
@click.option("--store", "store", default=None, type=click.Path(dir_okay=False),
              help="Label the cached vectors of this store instead of image files (no backbone is run).")
@click.option("--space", default=None, help="With --store: the space to label (default: the head's space).")
@click.option("--path", "paths", multiple=True,
              help="With --store: only this image (its path in the store); repeat. Default: every vector.")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="With --store: write the predictions to this CSV file, chunk by chunk, instead of printing them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def predict(head: str, images: tuple[str, ...], top_k: int, device: str, batch_size: int, keep_going: bool,
            store: str | None, space: str | None, paths: tuple[str, ...], out: str | None, as_json: bool) -> None:
    """Label IMAGES (files or folders), or a store's vectors (--store), with a head saved by
    `embedstore classify --save-head`.

    The images are embedded with the backbone recorded in the head (refused if its weights
    checksum differs), then classified; probabilities come from the head. With --store the
    store's cached vectors are labelled chunk by chunk (refused if the space has other weights).
    --top-k larger than the head's classes shows every class.
    """
    from embedstore.errors import CollectionError
    from embedstore.heads import load_head, predict_images
    from embedstore_cli.main import _table

    if store is None and (space or paths or out):
        raise click.UsageError("--space, --path and --out go with --store STORE.h5")
    if (store is None) == (not images):
        raise click.UsageError("give IMAGES to embed and label, or --store STORE.h5 to label its vectors (not both)")
    h = load_head(head)
    if store is not None:
        _predict_store(h, store, space, list(paths) or None, top_k, out, as_json)
        return
    preds = predict_images(h, list(images), top_k=top_k, device=device, batch_size=batch_size)
    failed = [p for p in preds if "error" in p]
    if failed and not keep_going:
        listed = "; ".join(f"{p['image']} ({p['error']})" for p in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise CollectionError(f"{len(failed)} of {len(preds)} image(s) could not be read: {listed}{more}; "
                              "fix or remove them, or pass --keep-going to label the others")
    if as_json:
        emit_json({"head": str(h.path), "space": h.space, "backbone": h.lineage.get("backbone"), "model": h.model,
                   "predictions": preds, "failed": len(failed)})
        return
    rows = [[p["image"], p.get("label", "-"), f"{p['probability']:.3f}" if "probability" in p else "-",
             ", ".join(f"{t['label']} {t['p']:.2f}" for t in p["top"]) if "top" in p else f"ERROR {p['error']}"]
            for p in preds]
    click.echo(_table(rows, ["image", "label", "p", f"top {min(top_k, len(h.classes))}"]))
    if failed:
        click.echo(f"{len(failed)} of {len(preds)} image(s) could not be read (listed as ERROR above)", err=True)


def _predict_store(h: Any, store: str, space: str | None, paths: list[str] | None, top_k: int, out: str | None,
                   as_json: bool) -> None:
    """``predict --store``: the store's vectors labelled chunk by chunk, to a CSV file or printed.

    Printed output is written a chunk at a time too (the JSON text is what ``emit_json`` would print
    for the whole list; a table's columns are aligned within each chunk), so memory follows one chunk.
    """
    from embedstore.heads import predict_store, write_predictions
    from embedstore_cli.main import _table

    chunks = predict_store(h, store, space=space, paths=paths, top_k=top_k)
    if out is not None:
        n = write_predictions(out, chunks)
        if as_json:
            emit_json({"head": str(h.path), "store": store, "model": h.model, "out": out, "predictions": n})
        else:
            click.echo(f"{n} prediction(s) written to {out}")
        return
    chunks = itertools.chain([next(chunks, [])], chunks)  # another space's head is refused before any output
    if as_json:
        _echo_json_list({"head": str(h.path), "store": store, "space": space or h.space, "model": h.model},
                        "predictions", chunks)
        return
    header = ["image", "label", "p", f"top {min(top_k, len(h.classes))}"]
    printed = False
    for preds in chunks:
        if preds or not printed:  # the header once (alone for no prediction), then each chunk's rows
            rows = [[p["path"], p["label"], f"{p['probability']:.3f}",
                     ", ".join(f"{t['label']} {t['p']:.2f}" for t in p["top"])] for p in preds]
            lines = _table(rows, header).split("\n")
            click.echo("\n".join(lines[2:] if printed else lines))
            printed = True


def _echo_json_list(head: dict[str, Any], key: str, chunks: Iterator[list[Any]]) -> None:
    """Print ``{**head, key: [every item of chunks]}`` as ``emit_json`` would, one chunk at a time."""
    opening = json.dumps({**head, key: []}, indent=2, default=str)  # ends with '"KEY": []' and '}'
    click.echo(opening[: -len("]\n}")], nl=False)
    first = True
    for chunk in chunks:
        for item in chunk:
            click.echo(("\n" if first else ",\n") + textwrap.indent(json.dumps(item, indent=2, default=str), "    "),
                       nl=False)
            first = False
    click.echo("]\n}" if first else "\n  ]\n}")


def register(group: click.Group) -> None:
    """Add ``classify`` and ``predict`` to a click group (the ``embedstore`` command)."""
    group.add_command(classify)
    group.add_command(predict)
