"""``embedstore report``: a thin layer over :func:`embedstore.report.write_report`.

Wire into the main group with ``register(main)``. Crash safety: the page is written by
:func:`write_report` (atomically); this module writes nothing itself.
"""
from __future__ import annotations

import os

import click

from embedstore.choices import DUPLICATES_THRESHOLD
from embedstore_cli.friendly import emit_json, friendly


def default_out(store: str) -> str:
    """``photos.h5`` -> ``photos.report.html`` next to it (wherever the command runs)."""
    return f"{os.path.splitext(store)[0]}.report.html"


@click.command("report")
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False),
              help="HTML file to write. Default: STORE with .report.html instead of .h5.")
@click.option("--space", "spaces", multiple=True, help="Space to show; repeat for several. Default: every space.")
@click.option("--max-points", default=2000, show_default=True, type=click.IntRange(1),
              help="Most images drawn on each space's map (a seeded random sample).")
@click.option("--queries", default=8, show_default=True, type=click.IntRange(0),
              help="Query images of the nearest-neighbour galleries (the same ones in every space).")
@click.option("-k", default=5, show_default=True, type=click.IntRange(1), help="Neighbours shown per query.")
@click.option("--models", default="logreg,knn", show_default=True,
              help="Classifier heads to compare: comma list, 'all' (slower), or 'none' to skip.")
@click.option("--threshold", default=DUPLICATES_THRESHOLD, show_default=True, type=click.FloatRange(-1, 1),
              help="Cosine similarity at or above which images count as near-duplicates (as `duplicates`).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2 ** 32 - 1),
              help="Seed of the samples and of the 2-D map.")
@click.option("--no-audit", is_flag=True, help="Leave out the Audit section (label issues, outliers, leaks).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object (with seconds per stage).")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@friendly
def report(store: str, out: str | None, spaces: tuple[str, ...], max_points: int, queries: int, k: int, models: str,
           threshold: float, seed: int, no_audit: bool, as_json: bool, quiet: bool) -> None:
    """Write one self-contained HTML page about STORE: open it in any browser, offline.

    \b
    The page shows:
      collection      images, labels, splits, spaces, and the failures table
      map             a 2-D map of each space coloured by label; hover a point to see
                      its image (UMAP if umap-learn is installed, else t-SNE; PCA for
                      tiny sets; the page says which)
      neighbours      galleries of nearest neighbours for a few query images
      near-duplicates groups of images above --threshold cosine similarity
      classifiers     heads compared on the cached vectors, and the best one's
                      confusion matrix (stores with 2 or more labels)
      audit           label issues, outliers and leaks between splits of the first
                      space, with thumbnails (`embedstore audit`; labelled stores)
      fine-tuning     frozen vs fine-tuned space, when `embedstore finetune` made one
    Thumbnails, plots and script are inline: nothing is fetched when the page opens.
    Big collections are sampled (--max-points, --queries) and the page says how.
    Images whose file is gone, or no longer matches the content hash recorded when it
    was embedded, show a grey placeholder (a store's paths are not trusted).
    A progress line per stage goes to stderr (not with --json or --quiet).

    \b
    Examples:
      embedstore report photos.h5                     # writes photos.report.html
      embedstore report photos.h5 --out r.html --max-points 500 --models all
    """
    from embedstore.heads import parse_models
    from embedstore.report import write_report
    from embedstore.utils import format_size

    heads = [] if models.strip() in ("none", "") else parse_models(models)
    out = out or default_out(store)
    say = None if as_json or quiet else (lambda line: click.echo(line, err=True))
    summary = write_report(store, out, space=list(spaces) or None, max_points=max_points, queries=queries, k=k,
                           models=heads, threshold=threshold, seed=seed, audit=not no_audit,
                           progress=say)
    if as_json:
        emit_json(summary)
        return
    maps = ", ".join(f"{name}: {s['map_points']} of {s['of']} points ({summary['projection'][name]})"
                     for name, s in summary["sampled"].items())
    click.echo(f"wrote {summary['path']} ({format_size(summary['bytes'])}B) in {summary['stages']['total']:.1f}s")
    click.echo(f"  sections: {', '.join(summary['sections'])}")
    click.echo(f"  maps: {maps}")
    if summary["classifiers"]:
        best = summary["classifiers"]
        click.echo(f"  best head: {best['space']} / {best['model']} ({best['accuracy']:.4f} accuracy)")
    if summary["audit"]:
        a = summary["audit"]
        click.echo(f"  audit: {a['label_issues']} label issue(s), {a['leaks']} leak pair(s) across splits")
    for note in summary["notes"]:
        click.echo(f"note: {note}", err=True)


def register(group: click.Group) -> None:
    """Add ``report`` to a click group (the ``embedstore`` command)."""
    group.add_command(report, "report")
