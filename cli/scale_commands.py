"""``embedstore merge``: a thin layer over :func:`embedstore.pipeline.merge`.
Add it to a group with ``register(group)``; the shard and Ray options live on ``embedstore embed``.
Crash safety: writes only through the library's merge (journal parts, atomic replace)."""
from __future__ import annotations

import click

from embedstore_cli.friendly import emit_json, friendly


@click.command("merge")
@click.argument("store", type=click.Path(dir_okay=False))
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--expect", type=click.IntRange(1), help="Refuse unless all N shards (shard-*-of-N) are finished.")
@click.option("--keep", is_flag=True, help="Keep the shard files after merging (default: delete them).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object.")
@friendly
def merge_command(store: str, files: tuple[str, ...], expect: int | None, keep: bool, as_json: bool) -> None:
    """Fold finished shard files into STORE (created if absent).

    \b
    Without FILES: every published shard of STORE, i.e. STORE.shards/shard-I-of-N.h5 as written by
      embedstore embed PATH --store STORE --shard I/N     (one job per shard, any scheduler)
    The result has the schema of a local run; a merge that is killed is completed by the next
    writer of STORE, and merging a shard twice changes nothing.
    """
    from embedstore.pipeline import merge

    summary = merge(store, list(files) or None, expect=expect, remove=not keep)
    if as_json:
        emit_json(summary)
        return
    rows = ", ".join(f"{k}: {v} rows" for k, v in summary["rows"].items()) or "no spaces"
    click.echo(f"{store}: merged {summary['merged']} shard file(s) in {summary['seconds']:.1f}s; "
               f"{summary['images_before']} -> {summary['images']} images ({rows}), {summary['failures']} failures")
    if summary["unfinished"]:
        click.echo(f"note: shards still in progress or killed: {', '.join(summary['unfinished'])}; "
                   "run them again (they resume), then merge again", err=True)


def register(group: click.Group) -> None:
    """Add ``merge`` to a click group (the ``embedstore`` command)."""
    group.add_command(merge_command, "merge")
