"""``embedstore import`` and ``embedstore export``: thin layers over :func:`embedstore.pipeline.import_vectors`
(vectors that another tool embedded, in clip-retrieval's output layout) and
:func:`embedstore.pipeline.export_vectors` (a space written in that layout, for autofaiss and embedding-reader).
Add them to a group with ``register(group)``.

Crash safety: writes only through the library (one durable journal part per chunk; parts published whole by
rename); nothing here writes.
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


@click.command("export")
@click.argument("store", type=click.Path(dir_okay=False))
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(dir_okay=True, file_okay=False))
@click.option("--space", default=None, help="Space to export. Default: the store's default space (as search picks it).")
@click.option("--part-rows", default=1_000_000, show_default=True, type=click.IntRange(1),
              help="Rows per part (img_emb_<i>.npy / metadata_<i>.parquet).")
@click.option("--absolute-paths", is_flag=True,
              help="Write every image_path absolute (default: as the store records them, relative to its root).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly
def export_command(store: str, out_dir: str, space: str | None, part_rows: int, absolute_paths: bool,
                   as_json: bool, quiet: bool) -> None:
    """Export a space of STORE into OUT_DIR in clip-retrieval's layout (what autofaiss reads).

    \b
    OUT_DIR layout (what clip-retrieval's inference writes, and `import` reads):
      OUT_DIR/img_emb/img_emb_<i>.npy          (rows, dim) in the stored dtype (float16 stays float16)
      OUT_DIR/metadata/metadata_<i>.parquet    same rows: image_path, label, split (null = none)
      OUT_DIR/embedstore.json                  store, space, lineage, root (written last)
    <i> is zero-padded like clip-retrieval's, so name order is row order: an
    autofaiss id is the space's position. image_path is as the store records it
    (relative to the store root, which embedstore.json records and `import` uses
    as its default root), or absolute with --absolute-paths. Memory is one chunk
    of rows, whatever the space's size. Parts appear whole (temporary file, then
    rename); an OUT_DIR that holds an export already is refused, never overwritten.

    \b
    Example:
      embedstore export photos.h5 photos_emb/
      autofaiss build_index --embeddings=photos_emb/img_emb --index_path=knn.index --index_infos_path=infos.json
      embedstore import copy.h5 photos_emb/ --space photos
    """
    from embedstore.pipeline.exporter import export_vectors  # numpy, h5py, pyarrow: only when run

    summary = export_vectors(store, out_dir, space=space, part_rows=part_rows, absolute_paths=absolute_paths,
                             progress=not quiet)
    if as_json:
        emit_json(summary)
        return
    click.echo(f"{out_dir}: space {summary['space']} of {store}: {summary['rows']} {summary['dim']}-d "
               f"{summary['dtype']} vectors in {summary['parts']} part(s), {summary['bytes'] / 2**20:.1f} MiB "
               f"in {summary['seconds']['total']:.1f}s")
    click.echo(f"index it with: autofaiss build_index --embeddings={out_dir.rstrip('/')}/img_emb "
               "--index_path=knn.index --index_infos_path=infos.json")


def register(group: click.Group) -> None:
    """Add ``import`` and ``export`` to a click group (the ``embedstore`` command)."""
    group.add_command(import_command, "import")
    group.add_command(export_command, "export")
