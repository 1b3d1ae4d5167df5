"""``embedstore audit``: curation over a space (label issues, outliers, leaks between splits).

A thin layer over :func:`embedstore.curation.audit`; wire into the main group with ``register(main)``.
Crash safety: writes nothing itself (the library keeps the k-NN graph cache that ``duplicates`` keeps).
"""
from __future__ import annotations

from typing import Any

import click

from embedstore.choices import DUPLICATES_THRESHOLD, HEADS
from embedstore_cli.friendly import emit_json, friendly


@click.command("audit")
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--space", default=None, help="Space to audit. Default: the store's default space.")
@click.option("--head", default="logreg", show_default=True, type=click.Choice(HEADS),
              help="Head whose out-of-fold probabilities score the labels (as `classify` fits it).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2),
              help="Folds of the cross-validation: each image is scored by a head fitted on the other folds.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(1),
              help="Rows listed per section (the counts always cover everything found).")
@click.option("--leak-threshold", default=DUPLICATES_THRESHOLD, show_default=True, type=click.FloatRange(-1, 1),
              help="Cosine similarity at or above which two images of different splits count as a leak "
                   "(the near-duplicate cut of `duplicates`).")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1),
              help="Neighbours per image in the k-NN graph (outlier distance, leak candidates).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2 ** 32 - 1),
              help="Seed of the folds and of the heads' validation carve.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: label_issues, outliers, leaks, summary.")
@friendly
def audit(store: str, space: str | None, head: str, folds: int, top: int, leak_threshold: float, k: int, seed: int,
          as_json: bool) -> None:
    """Find what to fix in a labelled collection: wrong labels, odd images, leaks between splits.

    \b
    label issues  every labelled image is scored by a head trained on the other folds
                  (never on itself); cleanlab's find_label_issues picks the images whose
                  label disagrees and ranks them, least confident first: given label,
                  suggested label, and the given label's out-of-fold probability
    outliers      the images farthest from their k nearest neighbours (mean cosine
                  distance): off-topic photos, corrupt files, rare views
    leaks         near-duplicate pairs across train/val/test (re-encoded, resized or
                  cropped copies) that make val or test scores too good
    The k-NN graph is the one `duplicates` builds and caches beside the index.

    \b
    Examples:
      embedstore audit photos.h5
      embedstore audit photos.h5 --space clip --head knn --top 50 --json
      embedstore report photos.h5      # the same audit, with thumbnails
    """
    from embedstore.curation import audit as run
    from embedstore_cli.main import _table

    report = run(store, space=space, head=head, folds=folds, top=top, leak_threshold=leak_threshold, k=k, seed=seed)
    if as_json:
        emit_json(report.to_dict())
        return
    s, notes = report.summary, report.summary["notes"]
    click.echo(f"{s['store']}, space {s['space']}: {s['images']} images")
    click.echo(f"\nlabel issues: {s['label_issues']} of {s['checked']} labelled images checked"
               + (f" ({s['head']}, {s['folds']}-fold out-of-fold probabilities, ranked by cleanlab "
                  f"{s['rank_by'].replace('_', '-')})" if s["folds"] else ""))
    _section(report.label_issues, ["path", "split", "label", "suggested", "p(label)", "p(suggested)"],
             lambda r: [r["path"], r["split"] or "-", r["label"], r["suggested"], f"{r['score']:.3f}",
                        f"{r['suggested_score']:.3f}"], s["label_issues"], notes["label_issues"], _table)
    click.echo(f"\noutliers: the most isolated of {s['outliers_scored']} images (mean cosine distance to their "
               f"{s['k']} nearest)")
    _section(report.outliers, ["path", "split", "label", "distance"],
             lambda r: [r["path"], r["split"] or "-", r["label"] or "-", f"{r['score']:.3f}"], len(report.outliers),
             notes["outliers"], _table)
    click.echo(f"\nleaks: {s['leak_pairs']} pair(s) across splits at cosine >= {s['leak_threshold']}")
    _section(report.leaks, ["cosine", "split", "path", "split", "path"],
             lambda r: [f"{r['score']:.3f}", r["a"]["split"], r["a"]["path"], r["b"]["split"], r["b"]["path"]],
             s["leak_pairs"], notes["leaks"], _table)


def _section(rows: list[dict[str, Any]], header: list[str], cells: Any, total: int, notes: list[str],
             table: Any) -> None:
    if rows:
        click.echo(table([cells(r) for r in rows], header))
        if total > len(rows):
            click.echo(f"... and {total - len(rows)} more (--top N lists more, --json gives them to scripts)")
    for note in notes:
        click.echo(f"note: {note}")


def register(group: click.Group) -> None:
    """Add ``audit`` to a click group (the ``embedstore`` command)."""
    group.add_command(audit, "audit")
