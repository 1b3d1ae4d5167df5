"""``embedstore import``: a thin layer over :func:`embedstore.pipeline.import_vectors` (vectors that another
tool embedded, in clip-retrieval's output layout). Add it to a group with ``register(group)``.

Crash safety: writes only through the library (one durable journal part per chunk); nothing here writes.
"""
from __future__ import annotations

import click

from embedstore.choices import STORE_DTYPES
from embedstore_cli.friendly import emit_json, friendly


@click.command("import")
@click.argument("store", type=click.Path(dir_okay=False))
@click.argument("folder", metavar="DIR", type=click.Path())
@click.option("--space", required=True, help="Name of the new space the vectors go into.")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="What the image_path values are relative to (the store root). Default: DIR.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(STORE_DTYPES),
              help="Stored vector type (an existing space keeps its own).")
@click.option("--chunk-rows", default=65536, show_default=True, type=click.IntRange(1),
              help="Rows read and committed at a time (one durable journal part each).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly
def import_command(store: str, folder: str, space: str, root: str | None, dtype: str, chunk_rows: int,
                   as_json: bool, quiet: bool) -> None:
    """Import vectors embedded elsewhere (clip-retrieval's output folder DIR) into a new space of STORE.

    \b
    DIR layout (what clip-retrieval's inference writes):
      DIR/img_emb/img_emb_<i>.npy          float16/float32 array (rows, dim)
      DIR/metadata/metadata_<i>.parquet    same rows: image_path, optional label, split
    Parts are matched by <i> and read in numeric order, one chunk at a time.
    image_path values are stored as given, relative to --root (default DIR);
    label / split nulls mean none. The space records that it was imported and
    from where (backbone "imported"): search it by --row or --path, classify
    its labels, index it (image queries would need the model that made it).
    A killed import keeps what it committed; run the same command again to
    finish it (rows already in the space are skipped).

    \b
    Example:
      embedstore import photos.h5 clip_out/ --space clip-vit-b32
      embedstore search photos.h5 --space clip-vit-b32 --row 0
    """
    from embedstore.pipeline.importer import import_vectors  # numpy, h5py, pyarrow: only when run

    summary = import_vectors(store, folder, space=space, root=root, dtype=dtype, progress=not quiet,
                             chunk_rows=chunk_rows)
    if as_json:
        emit_json(summary)
        return
    click.echo(f"{store}: space {summary['space']} ({summary['dim']}-d {summary['dtype']}) from {summary['source']}: "
               f"{summary['imported']} imported, {summary['skipped']} skipped, {summary['failures']} failed "
               f"of {summary['rows']} rows in {summary['parts']} part(s) in {summary['seconds']:.1f}s")
    if summary["failures"]:
        click.echo(f"see the failures with: embedstore info {store} --failures")


def register(group: click.Group) -> None:
    """Add ``import`` to a click group (the ``embedstore`` command)."""
    group.add_command(import_command, "import")
