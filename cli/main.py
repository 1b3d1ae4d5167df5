"""The ``embedstore`` command: a thin layer over the library's public functions (error policy: ``friendly``).

Crash safety: the commands write only through the library (atomic writes, journaled store); this
module writes nothing itself.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import click

import embedstore
from embedstore.choices import ENGINES, MAX_SHARDS, PRECISIONS, RUNTIMES, STORE_DTYPES
from embedstore_cli.friendly import emit_json, friendly, workers_option


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(embedstore.__version__, prog_name="embedstore")
def main() -> None:
    """Embed image collections once with frozen pretrained backbones; reuse the vectors.

    \b
    Typical session:
      embedstore demo                                  # built-in example, offline
      embedstore embed photos/                         # folder -> HDF5 store photos.h5
      embedstore info photos.h5                        # what is in it
      embedstore backbones                             # models you can use
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--check", is_flag=True, help="Load each installed backbone and confirm its dim and input size (slow).")
@friendly
def backbones(as_json: bool, check: bool) -> None:
    """List backbones that work offline here, and how to name any other model.

    \b
    Besides these names, --backbone takes:
      any timm model name        e.g. resnet50, convnext_tiny, vit_small_patch16_224
                                 (pretrained weights from timm's cache or hub when reachable)
      torchvision:<name>         e.g. torchvision:resnet18
      open_clip:<arch>           a CLIP model, e.g. open_clip:ViT-B-32, whose text tower
                                 also serves `search --text` and the zeroshot head;
                                 --weights TAG (e.g. laion2b_s34b_b79k) from the local
                                 Hugging Face cache (pip install 'tl-embedstore[clip]')
      with --weights FILE        a local .pth/.safetensors state dict for that architecture
      with --weights random      a seeded untrained network (for tests and baselines)
    """
    from embedstore.backbones import list_backbones  # a static table: no torch, no model built

    rows = list_backbones()
    if check:
        from embedstore_cli.friendly import check_backbones

        check_backbones(rows)
    if as_json:
        emit_json(rows)
        return
    header = ["name", "dim", "input", "offline", "weights"] + (["check"] if check else [])
    click.echo(_table(
        [[r["name"], r["dim"], r["input_size"], "yes" if r["offline"] else "no", r["weights"]]
         + ([r["check"]] if check else []) for r in rows],
        header,
    ))
    click.echo("\nAlso: any timm name (timm.list_models()), torchvision:<name>, open_clip:<arch>, "
               "--weights FILE|random.")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--store", "store", default=None, type=click.Path(dir_okay=False),
              help="HDF5 store to create or extend. Default: beside PATH, photos/ -> photos.h5, list.csv -> list.h5.")
@click.option("--backbone", default=embedstore.DEFAULT_BACKBONE, show_default=True,
              help="Registry name, timm name, torchvision:<name> or open_clip:<arch> (CLIP, with a text tower).")
@click.option("--weights", default=None,
              help="Local checkpoint (.pth/.safetensors), 'random', or for open_clip: an open_clip pretrained tag "
                   "such as laion2b_s34b_b79k (from the local cache). Default: pretrained.")
@click.option("--space", default=None, help="Name of the embedding space. Default: derived from backbone and weights.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(PRECISIONS),
              help="auto: bf16 on AMX/AVX512-BF16 CPUs, fp16/bf16 on GPU. torch computes in each; openvino in "
                   "fp32 or bf16; onnxruntime in fp32 only.")
@click.option("--runtime", default="auto", show_default=True, type=click.Choice(RUNTIMES),
              help="Inference runtime. torch: eager PyTorch. onnxruntime, openvino: the backbone exported once to "
                   "ONNX (cached in $EMBEDSTORE_CACHE, else ~/.cache/embedstore), on the CPU; checked first "
                   "against torch fp32 on a few of the images (cosine per image: 0.999 in fp32, 0.99 in bf16), "
                   "else torch embeds and the summary says why. auto: torch on a GPU or with --precision fp16; "
                   "on a CPU, runs of 1000+ images time torch against the installed runtimes on a few batches "
                   "and keep the fastest (a runtime must win by 10%), remembered per machine and backbone; "
                   "smaller runs use torch unless a probe is on record. One space takes vectors of any runtime.")
@click.option("--workers", default="auto", show_default=True, callback=workers_option, metavar="auto|N",
              help="Decode worker processes (0: decode in this process). auto: on a GPU every core but one; on "
                   "a CPU with more than 2 cores, the cost of decoding and of the model is measured on the first "
                   "images and the cores shared in that ratio (the summary notes it); on 1-2 cores, one per core.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(STORE_DTYPES),
              help="Stored vector type.")
@click.option("--engine", default="local", show_default=True, type=click.Choice(ENGINES),
              help="local: this process. ray: shards on a Ray cluster (pip install -e .[ray] in a checkout, or pip install ray), then merged.")
@click.option("--address", default=None, help="Ray cluster: auto or ray://HOST:PORT. Default: a local Ray.")
@click.option("--shards", default=None, type=click.IntRange(1, MAX_SHARDS),
              help="Ray: number of shards (default 4 per worker).")
@click.option("--gpus-per-worker", default=None, type=click.FloatRange(0),
              help="Ray: GPUs per worker (default 1 if any, else 0).")
@click.option("--cpus-per-worker", default=None, type=click.FloatRange(0, min_open=True),
              help="Ray: CPUs per worker (default 1 with GPUs, else 2).")
@click.option("--shard", default=None, metavar="I/N",
              help="Embed only shard I of N into STORE.shards/ (any scheduler); combine with `embedstore merge`.")
@click.option("--follow-symlinks", is_flag=True,
              help="In a folder, embed what symlinks lead to outside it (default: recorded as failures).")
@click.option("--max-file-size", default="256M", show_default=True, metavar="SIZE",
              help="Files larger than this are recorded as failures unread (bytes, or e.g. 64M, 1G).")
@click.option("--path-column", default=None, metavar="NAME",
              help="Table: the column of image paths or URLs (default: path, url, image, filepath, file, ...).")
@click.option("--label-column", default=None, metavar="NAME", help="Table: the column of labels (default: label or class).")
@click.option("--split-column", default=None, metavar="NAME", help="Table: the column of splits (default: split).")
@click.option("--url-timeout", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True),
              metavar="SECONDS", help="URL rows: the longest wait for each read of a download (10x for a whole one).")
@click.option("--url-retries", default=2, show_default=True, type=click.IntRange(0),
              help="URL rows: retries after a timeout, connection error or HTTP 5xx/429 (not after a 404).")
@click.option("--url-concurrency", default=16, show_default=True, type=click.IntRange(1),
              help="URL rows: downloads at a time in each decode worker.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly
def embed(path: str, store: str | None, backbone: str, weights: str | None, space: str | None, batch_size: int,
          device: str, precision: str, runtime: str, workers: int | None, dtype: str, engine: str,
          address: str | None,
          shards: int | None, gpus_per_worker: float | None, cpus_per_worker: float | None, shard: str | None,
          follow_symlinks: bool, max_file_size: str, path_column: str | None, label_column: str | None,
          split_column: str | None, url_timeout: float, url_retries: int, url_concurrency: int, as_json: bool,
          quiet: bool) -> None:
    """Embed the images under PATH (a folder, tar shards or a table) into an HDF5 store.

    \b
    PATH layouts:
      folder/<class>/img.jpg                 labels from the folder names
      folder/<train|val|test>/<class>/img    labels and splits
      shard.tar, or folder/*.tar             webdataset shards, read without unpacking:
                                             KEY.jpg + KEY.cls|KEY.json ("label")|KEY.txt
      list.csv, list.parquet                 path[,label[,split]] per row, or a header row
                                             naming path|url|image|filepath|file|image_path,
                                             label|class, split (--path-column etc. for
                                             others); paths, file://, http(s):// or fsspec
                                             URLs (s3://, gs:// with s3fs, gcsfs installed)
    The store defaults to PATH's name beside it: photos/ -> photos.h5, list.csv -> list.h5.
    Re-running embeds only new or changed files (and loads no model when nothing is new);
    URLs already embedded are not downloaded again.
    A killed run resumes where it stopped. Unreadable files, anything but a regular file,
    files over --max-file-size, symlinks out of the folder and failed downloads are recorded
    as failures (see `embedstore info --failures`) and the run goes on; a rerun retries the
    downloads that timed out or met a server error, not the 404s.
    Scale-out: --engine ray runs shards on a Ray cluster; --shard I/N runs one shard here.
    """
    from embedstore.pipeline import parse_shard
    from embedstore.utils import parse_size

    max_bytes = parse_size(max_file_size)
    shard_pair = parse_shard(shard) if shard is not None else None
    columns = {k: v for k, v in (("path", path_column), ("label", label_column), ("split", split_column)) if v}
    fetch = embedstore.data.Fetch(timeout=url_timeout, retries=url_retries, concurrency=url_concurrency)
    chosen = store is None
    if chosen:
        store = default_store(path)
    summary = embedstore.embed(path, store, backbone=backbone, weights=weights, space=space,
                               batch_size=batch_size, device=device, precision=precision, runtime=runtime,
                               workers=workers, dtype=dtype, progress=not quiet, shard=shard_pair, engine=engine,
                               address=address, shards=shards, gpus_per_worker=gpus_per_worker,
                               cpus_per_worker=cpus_per_worker, follow_symlinks=follow_symlinks,
                               max_bytes=max_bytes, columns=columns or None, fetch=fetch)
    if as_json:
        emit_json(summary)
        return
    if chosen:
        click.echo(f"store: {store} (the default beside {path}; choose another with --store)")
    if summary.get("shard_skipped"):
        click.echo(f"shard {summary['shard']} is finished already ({summary['shard_file']}); "
                   f"fold it in with: embedstore merge {store}")
        return
    target = summary.get("shard_file", summary["store"])
    click.echo(
        f"{target}: space {summary['space']} "
        f"({summary.get('runtime') or summary['precision']} on {summary['device']}): "
        f"{summary['embedded']} embedded, {summary['skipped']} skipped, {summary['failed']} failed "
        f"of {summary['images']} images in {summary['seconds']:.1f}s ({summary['images_per_s']:.1f} images/s)"
    )
    for note in summary.get("notes", ()):
        click.echo(f"note: {note}")
    if summary["failed"]:
        click.echo(f"see the failures with: embedstore info {store} --failures")


def default_store(path: str) -> str:
    """The store beside a collection: ``photos/`` -> ``photos.h5``, ``list.csv`` -> ``list.h5`` (absolute)."""
    src = os.path.abspath(path)
    if os.path.isdir(src):
        if os.path.dirname(src) == src:
            raise click.UsageError(f"{path} is a filesystem root: pass --store FILE.h5")
        return src.rstrip(os.sep) + ".h5"
    return os.path.splitext(src)[0] + ".h5"


@main.command()
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--failures", "show_failures", is_flag=True, help="List every recorded failure.")
@friendly
def info(store: str, as_json: bool, show_failures: bool) -> None:
    """Describe a store: images, labels, splits, embedding spaces and failures."""
    st = embedstore.open_store(store)  # the header and small metadata; no vectors, no torch
    summary = st.summary()  # counts kept in the file: no column is read
    if as_json:
        if show_failures:
            summary["failure_list"] = st.failures
        emit_json(summary)
        return
    click.echo(f"{store}: {summary['images']} images, {summary['failures']} failures (root {summary['root']})")
    if summary["absolute_paths"]:
        click.echo(f"  paths: {summary['absolute_paths']} absolute (outside the root)")
    if summary["journal_parts"]:
        click.echo(f"  {summary['journal_parts']} journal part(s) not yet folded in (a run is going or was killed)")
    if summary["labels"]:
        click.echo("  labels: " + ", ".join(f"{k} ({v})" for k, v in summary["labels"].items()))
    if summary["splits"]:
        click.echo("  splits: " + ", ".join(f"{k} ({v})" for k, v in summary["splits"].items()))
    if summary["spaces"]:
        rows = [[s["name"], s["backbone"], s["dim"], s["rows"], s["dtype"], ", ".join(s.get("runtimes") or [])]
                for s in summary["spaces"]]
        click.echo(_table(rows, ["space", "backbone", "dim", "rows", "dtype", "runtime"]))
    if show_failures:
        for f in st.failures:
            click.echo(f"  FAILED {f['path']}: {f['error']}: {f['message']}")


@main.command()
@click.option("--dir", "folder", default="embedstore-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where to write the example images and store.")
@click.option("--backbone", default=embedstore.DEFAULT_BACKBONE, show_default=True)
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(5), help="Digits per class.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def demo(folder: str, backbone: str, per_class: int, as_json: bool) -> None:
    """Run the main job on a built-in example that needs no download.

    Renders scikit-learn's handwritten digits to PNG files (train/val splits), embeds them into
    an HDF5 store with the default offline backbone, compares classifier heads on the cached
    vectors, searches the store with one of its images, and labels scikit-learn's two sample photos with the backbone's ImageNet head.
    """
    from embedstore import demo as d

    images = d.write_digits(os.path.join(folder, "digits"), per_class=per_class)
    store = os.path.join(folder, "digits.h5")
    summary = embedstore.embed(images, store, backbone=backbone, progress=not as_json)
    heads = d.compare_heads(store)
    neighbours = d.nearest_neighbours(store)
    photos = d.imagenet_top(d.write_sample_photos(os.path.join(folder, "photos")), backbone)
    if as_json:
        emit_json({"embed": summary, "classifiers": heads, "search": neighbours, "photos": photos})
        return
    click.echo(f"embedded {summary['embedded']} new images ({summary['skipped']} already in the store) "
               f"into {store} in {summary['seconds']:.1f}s")
    click.echo("classifier heads on the cached vectors (train -> val digits):")
    click.echo(_table([[h["model"], f"{h['accuracy']:.3f}", f"{h['balanced_accuracy']:.3f}", f"{h['fit_s']:.2f}",
                        ", ".join(f"{k}={v}" for k, v in h["params"].items())] for h in heads],
                      ["head", "accuracy", "balanced", "fit s", "chosen"]))
    click.echo(f"nearest neighbours of {neighbours['query']}: "
               + ", ".join(f"{h['label']} ({h['score']:.2f})" for h in neighbours["hits"]))
    for p in photos:
        click.echo(f"{p['image']}: " + ", ".join(f"{t['label']} ({t['p']:.2f})" for t in p["top"]))
    click.echo(f"\nnext: embedstore info {store}")


def _register_commands() -> None:
    """Add the commands of the later stages (each module has a ``register(group)``)."""
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(f"embedstore_cli.{module}").register(main)


COMMAND_MODULES = ("search_commands", "classify_commands", "curation_commands", "finetune_commands", "scale_commands",
                   "report_commands", "import_commands", "serve_commands")
_register_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
