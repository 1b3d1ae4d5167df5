"""``embedstore index``, ``embedstore search`` and ``embedstore duplicates``: thin layers over
:mod:`embedstore.index` and :mod:`embedstore.search`. Add them to a group with ``register(group)``."""
from __future__ import annotations

import csv
import json
import os
from typing import Any

import click

from embedstore.choices import DUPLICATES_THRESHOLD
from embedstore.choices import INDEX_KINDS as KINDS
from embedstore_cli.friendly import emit_json, friendly, size_option


def _table(rows: list[list[Any]], header: list[str], indent: str = "  ") -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _notes(notes: list[str]) -> None:
    for note in notes:
        click.echo(f"note: {note}", err=True)


@click.command("index")
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--space", help="Embedding space (default: the store's first frozen space).")
@click.option("--kind", default="auto", show_default=True,
              help=f"{'|'.join(KINDS)}, or a faiss factory string such as 'IVF256,SQ8'.")
@click.option("--memory", default="4G", show_default=True, callback=size_option,
              help="Memory budget of the whole build process, e.g. 2G or 8G: what it holds already + the "
                   "index + the training sample + one chunk (auto and ivf-pq pick an index that fits).")
@click.option("--target-recall", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="recall@10 against exact search that nprobe / efSearch / re-ranking are tuned to reach.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="cuda needs faiss's GPU build: pip install -e .[gpu] in a checkout (faiss-gpu-cu12).")
@click.option("--rebuild", is_flag=True, help="Build from scratch instead of adding new rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar as JSON.")
@friendly
def index_command(store: str, space: str | None, kind: str, memory: int, target_recall: float, device: str,
                  rebuild: bool, as_json: bool) -> None:
    """Build or update the FAISS index of a store's space (cosine similarity).

    \b
    auto picks by size and --memory: Flat below 20k vectors, HNSW32 below 100k;
    from 100k (or when those do not fit) IVF with fast-scan PQ codes, or OPQ+IVF+PQ
    when only smaller codes fit, whose top candidates are re-ranked exactly from the
    stored vectors. The vectors are streamed from the store: a training sample, then
    chunks. nprobe / efSearch / re-ranking depth are tuned until recall@10 on held-out
    queries reaches --target-recall. Saved in STORE.index/ with a JSON sidecar; search
    memory-maps it. Run it again after `embedstore embed`: only new or changed rows
    are added.
    """
    from embedstore.index import build_index

    info = build_index(store, space=space, kind=kind, memory=memory, target_recall=target_recall,
                       device=device, rebuild=rebuild)
    if as_json:
        emit_json(info)
        return
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items()) or "exact"
    what = {"full": f"built in {info['build_seconds']:.1f}s",
            "incremental": f"updated (+{info['added']} -{info['removed']} rows) in {info['build_seconds']:.1f}s",
            "unchanged": "already up to date"}[info["mode"]]
    rerank = f", re-ranked from the {info['rerank']}" if info.get("rerank") else ""
    click.echo(f"{store}: space {info['space']}: {info['factory']} over {info['rows']} rows {what} ({params}{rerank})")
    click.echo(f"  recall@10 {info['recall_at_10']:.3f} (target {info['target_recall']}), single query "
               f"p50 {info['latency_p50_ms']:.2f} ms, p99 {info['latency_p99_ms']:.2f} ms, "
               f"{info['bytes'] / 2**20:.1f} MiB -> {info['index_file']}")
    if info.get("memory_plan") and info["mode"] != "unchanged":
        peak = f", peak RSS {info['peak_rss']}" if info.get("peak_rss") else ""
        click.echo(f"  memory: {info['memory_plan']}{peak}")
    _notes(info.get("notes", []))


@click.command("search")
@click.argument("store", required=False, type=click.Path())
@click.argument("more_images", nargs=-1, metavar="[IMG]...", type=click.Path(exists=True))
@click.option("--query", "-q", "images", multiple=True, type=click.Path(exists=True),
              help="Query image or folder of images; more images may follow (--query a.jpg b.jpg).")
@click.option("--row", "rows", multiple=True, type=int, help="Query with the stored vector of this store row.")
@click.option("--path", "paths", multiple=True, help="Query with the stored vector of this image path.")
@click.option("--vector", "vector_file", type=click.Path(exists=True, dir_okay=False),
              help="Query with the vectors in FILE.npy (one vector, or one per row), of the space's model.")
@click.option("--text", "texts", multiple=True, metavar="TEXT",
              help='Query with a description, e.g. --text "a photo of a red car" (repeatable: one result list '
                   "each). Needs a space embedded with a CLIP backbone, e.g. `embedstore embed PHOTOS --backbone "
                   "open_clip:ViT-B-32 --weights laion2b_s34b_b79k`; its text tower puts the text into the image space.")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1), help="Neighbours per query.")
@click.option("--space", help="Embedding space (default: the store's first frozen space).")
@click.option("--where", multiple=True,
              help="Only images with label=NAME, split=NAME or a stored path starting with path=PREFIX (repeatable).")
@click.option("--exact", is_flag=True, help="Search exactly even when an index exists.")
@click.option("--exclude-self", is_flag=True,
              help="Leave each query's own store row out of its hits (a stored row, path or image file).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write every result to FILE.csv or FILE.json (folder queries: STORE.search/FOLDER.csv).")
@click.option("--json", "as_json", is_flag=True, help='Print {"results": [[{path, score, row, label, split}, ...], ...]}.')
@click.option("--server", metavar="URL",
              help="Ask a running `embedstore serve` (e.g. http://127.0.0.1:8000) instead of opening STORE: "
                   "same options, same output, without loading anything here. STORE may then be left out.")
@click.option("--token", envvar="EMBEDSTORE_TOKEN", show_envvar=True, help="The --server's token, if it has one.")
@friendly
def search_command(store: str | None, more_images: tuple[str, ...], images: tuple[str, ...], rows: tuple[int, ...],
                   paths: tuple[str, ...], vector_file: str | None, texts: tuple[str, ...], k: int, space: str | None,
                   where: tuple[str, ...], exact: bool, exclude_self: bool, out: str | None, as_json: bool,
                   server: str | None, token: str | None) -> None:
    """Find the images most similar to query images, store rows, stored paths, vectors or texts.

    Query images are embedded with the space's own backbone and preprocessing (refused when
    the weights differ from the ones that built the space). Without an index the search is
    exact, and says so. A folder of queries writes one CSV of results beside the store,
    STORE.search/FOLDER.csv (or where --out says), and prints its path.

    \b
    Text search (a space embedded with an open_clip: backbone):
      embedstore search photos.h5 --text "a dog on a beach" --text "a red car" -k 5
    """
    if server and store and not store.lower().endswith((".h5", ".hdf5")):
        more_images, store = (store, *more_images), None  # with --server, every argument may be an image
    if not server and not store:
        raise click.UsageError("give the STORE to search (or --server URL of a running `embedstore serve`)")
    if store and os.path.isdir(store):
        raise click.BadParameter(f"{store} is a folder: give the store file (FILE.h5) first, then query images",
                                 param_hint="STORE")
    images = images + more_images
    if sum(bool(x) for x in (images, rows, paths, vector_file, texts)) != 1:
        raise click.UsageError("give one kind of query: --query IMG..., --row N, --path P, --vector FILE.npy "
                               "or --text TEXT")
    from embedstore.choices import parse_where  # no faiss: a --server search loads nothing heavy

    vectors = _vectors(vector_file) if vector_file else None
    if server:
        result = _served_search(server, token, store, images=list(images) or None, rows=list(rows) or None,
                                paths=list(paths) or None, vectors=vectors, texts=list(texts) or None, k=k,
                                space=space, where=parse_where(list(where)), exact=exact, exclude_self=exclude_self)
    else:
        from embedstore.search import search

        result = search(store, images=list(images) or None, rows=list(rows) or None, paths=list(paths) or None,
                        vectors=vectors, texts=list(texts) or None, k=k, space=space,
                        where=parse_where(list(where)), exact=exact, exclude_self=exclude_self)
    folders = [p for p in images if os.path.isdir(p)]
    if out is None and folders and not server:  # beside the store, never in the current directory (served: printed)
        name = os.path.basename(os.path.abspath(folders[0])) or "queries"
        out = os.path.join(f"{store}.search", f"{name}.csv")
    if out:
        _write_results(out, result)
        click.echo(f"wrote {len(result['results'])} queries' results to {out}", err=True)
    if as_json:
        emit_json(result)
    elif not out:
        _print_results(result)
    _notes(result["notes"] + (["exact search"] if result["exact"] and not result["notes"] else []))


def _served_search(server: str, token: str | None, store: str | None, **query: Any) -> dict[str, Any]:
    """``search`` asked of a running server (embedstore.Client); ``store``, when given, must be the one
    it serves (compared by file name: the server may run on another machine)."""
    from embedstore.serve.client import Client

    with Client(server, token=token) as client:
        if store:
            served = client.info()["store"]
            if os.path.basename(served) != os.path.basename(store):
                raise click.UsageError(f"the server at {server} serves {served}, not {store}: leave STORE out "
                                       "or point --server at the server of that store")
        return client.search(**query)


def _vectors(path: str) -> Any:
    """The query vectors of a ``--vector`` file: a numeric .npy array of one or two dimensions."""
    import numpy as np

    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise click.BadParameter(f"cannot read {path} as a .npy array ({e}): save vectors with numpy.save",
                                 param_hint="--vector") from None
    if vectors.ndim not in (1, 2) or not np.issubdtype(vectors.dtype, np.number) or not vectors.size:
        raise click.BadParameter(f"{path} holds a {vectors.dtype} array of shape {vectors.shape}: give one vector "
                                 "or a 2-D array of vectors, one per row", param_hint="--vector")
    return vectors


def _print_results(result: dict[str, Any]) -> None:
    for q, hits in zip(result["queries"], result["results"]):
        click.echo(f"query {q['query']}" + (f" (row {q['row']})" if "row" in q else ""))
        if q.get("error"):
            click.echo(f"  cannot read it: {q['error']}")
            continue
        click.echo(_table([[i + 1, f"{h['score']:.4f}", h["row"], h["label"], h["path"]] for i, h in enumerate(hits)],
                          ["rank", "score", "row", "label", "path"]))


def _write_results(out: str, result: dict[str, Any]) -> None:
    """Write the results to ``out`` (.json, else CSV) atomically (``_atomic.atomic_write``)."""
    from embedstore._atomic import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            if out.lower().endswith(".json"):
                json.dump(result, f, indent=2, default=str)
                return
            w = csv.writer(f)
            w.writerow(["query", "rank", "path", "score", "row", "label", "error"])
            for q, hits in zip(result["queries"], result["results"]):
                if q.get("error"):
                    w.writerow([q["query"], "", "", "", "", "", q["error"]])
                for i, h in enumerate(hits):
                    w.writerow([q["query"], i + 1, h["path"], h["score"], h["row"], h["label"], ""])

    atomic_write(out, write)


@click.command("duplicates")
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--threshold", default=DUPLICATES_THRESHOLD, type=click.FloatRange(-1, 1),
              help="Cosine similarity at or above which two images count as duplicates "
                   f"[default: {DUPLICATES_THRESHOLD}, calibrated on re-encoded, resized and cropped copies by "
                   "benchmarks/duplicates.py].")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1),
              help="Neighbours per image in the k-NN graph.")
@click.option("--space", help="Embedding space (default: the store's first frozen space).")
@click.option("--no-cache", is_flag=True, help="Neither read nor keep the k-NN graph in STORE.index/.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def duplicates_command(store: str, threshold: float, k: int, space: str | None, no_cache: bool,
                       as_json: bool) -> None:
    """Groups of near-duplicate images, from the index's k-NN graph (connected components).

    The k-NN graph is built in batches on all cores and kept beside the index
    (STORE.index/SPACE.knn-K-gGENERATION/): a run that was stopped resumes from the
    batches it finished, and another --threshold reuses the graph (seconds). A
    change to the space starts a new graph.
    """
    from embedstore.search import duplicates

    result = duplicates(store, threshold=threshold, k=k, space=space, cache=not no_cache)
    if as_json:
        emit_json(result)
        return
    groups = result["groups"]
    click.echo(f"{len(groups)} groups of near-duplicates ({result['in_groups']} of {result['images']} images, "
               f"cosine >= {result['threshold']})")
    for i, g in enumerate(groups, 1):
        click.echo(f"group {i}: {g['size']} images, lowest linking cosine {g['min_score']:.4f}")
        for m in g["members"]:
            click.echo(f"  {m['row']:>8}  {m['label'] or '-':<16} {m['path']}")
    cache = result.get("knn_cache") or {}
    if cache.get("folder"):
        click.echo(f"k-NN graph: {cache['reused']} of {cache['batches']} batches reused, {cache['computed']} "
                   f"computed, kept in {cache['folder']}", err=True)
    _notes(result["notes"])


def register(group: click.Group) -> None:
    """Add ``index``, ``search`` and ``duplicates`` to a click group (the ``embedstore`` command)."""
    group.add_command(index_command, "index")
    group.add_command(search_command, "search")
    group.add_command(duplicates_command, "duplicates")
