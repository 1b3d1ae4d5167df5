"""``report``: one self-contained HTML page that shows what is in a store.

Sections: the collection summary and its failures; per embedding space a 2-D map coloured by
label (thumbnails on hover), nearest-neighbour galleries and near-duplicate groups; the
classifier comparison with the best head's confusion matrix and the audit (label issues,
outliers, leaks between splits: :mod:`.audit`) of labelled stores; frozen vs fine-tuned spaces
side by side. Everything is inline (JPEG thumbnails as ``data:`` URIs, SVG, CSS, a little JS),
so the file opens offline and can be mailed around. Large collections are
sampled (seeded) and the page says how.

The page is rendered from the package's Jinja2 template ``report/templates/report.html.j2`` with
autoescape on: this module hands it plain values (no HTML), so nothing from a store can inject
markup. Thumbnails come only from files that still match their recorded hash (:mod:`.thumbs`).

Crash-safety: the store is only read; the page is written with ``_atomic.atomic_write_bytes`` (a
temporary file beside ``out``, fsync'd, renamed over it), so ``out`` is either the old page or the whole new one.
"""
from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .._atomic import atomic_write_bytes
from .._vectors import l2_normalize
from ..choices import DUPLICATES_THRESHOLD
from ..errors import EmbedstoreError, IndexFileError, ReportError
from .audit import audit_data
from .sections import MAX_FAILURES_SHOWN, failures_data, finetune_data, label_colors, space_data, summary_data
from .thumbs import Thumbnails
from ..store import Space, Store, open_store
from ..utils import free_cores, timed

PCA_BELOW = 25  # fewer points than this: PCA (t-SNE and UMAP need neighbourhoods)
MAX_GROUPS_SHOWN = 12
MAX_GROUP_MEMBERS = 8
MAX_MATRIX_CLASSES = 40
REPORT_MODELS = ("logreg", "knn")  # the heads compared by default: quick, and usually the best two
STAGES = ("imports", "open_store", "summary", "projection", "thumbnails", "neighbours", "duplicates", "classifiers",
          "audit", "html")


# --------------------------------------------------------------------------- entry point


def write_report(store: str | os.PathLike | Store, out: str | os.PathLike, *,
                 space: str | Sequence[str] | None = None, max_points: int = 2000, queries: int = 8, k: int = 5,
                 models: Sequence[str] | None = REPORT_MODELS, threshold: float = DUPLICATES_THRESHOLD,
                 thumb_px: int = 72, audit: bool = True,
                 seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write a self-contained HTML report of a store to ``out``.

    Args:
        store: the ``.h5`` store (path or open ``Store``).
        out: the HTML file to write (replaced atomically).
        space: a space name or list of names (default: every space).
        max_points: most images drawn on each space's map (a seeded random sample).
        queries: nearest-neighbour queries shown per space (the same images in every space).
        k: neighbours shown per query.
        models: names of the classifier heads to compare, e.g. ``["logreg", "knn"]`` (the default);
            ``None`` compares every head, an empty list skips the comparison.
        threshold: cosine similarity at or above which images count as near-duplicates (default: the
            ``duplicates`` default, :data:`embedstore.choices.DUPLICATES_THRESHOLD`).
        thumb_px: longest side of the JPEG thumbnails.
        audit: add the Audit section (:func:`embedstore.curation.audit` of the first space: label issues,
            outliers, leaks between splits at ``threshold``) when the store has labels.
        seed: seed of every sample and of the 2-D projection (0 to 2**32 - 1).
        progress: called with one line per finished stage (what it did and its seconds).

    ``max_points``, ``queries`` and ``k`` larger than the store are lowered to what it holds (with a note).
    Returns a JSON-ready summary: ``path`` (absolute), ``bytes``, ``sections``, ``sampled`` (map points
    and queries per space), ``projection`` (method per space), ``missing_images``, ``changed_images``,
    ``notes`` and ``stages`` (seconds per stage, and ``total``; also under the older name ``seconds``).
    """
    if max_points < 1 or queries < 0 or k < 1 or not -1 <= threshold <= 1 or not 0 <= seed < 2 ** 32:
        raise ReportError(f"cannot write a report with max_points={max_points}, queries={queries}, k={k}, "
                          f"threshold={threshold}, seed={seed}: max_points and k must be at least 1, queries at "
                          "least 0, threshold in [-1, 1] and seed in [0, 2**32 - 1]")
    if isinstance(models, str):
        raise ReportError(f"models takes a list of head names such as ['logreg', 'knn'] (None: all, []: none), "
                          f"not the string {models!r}; the CLI's comma list is parsed by embedstore.heads.parse_models")
    t0 = time.perf_counter()
    stages: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def stage(name: str, what: str) -> Iterator[None]:
        t = time.perf_counter()
        with timed(stages, name):
            yield
        if progress is not None:
            progress(f"report: {what}: {time.perf_counter() - t:.1f}s")

    out = Path(os.path.abspath(out))
    with stage("open_store", "opened the store"):  # first: a damaged store is one error line, nothing before it
        st = store if isinstance(store, Store) else open_store(store)
        spaces = [st.space(n) for n in ([space] if isinstance(space, str) else space or list(st.spaces))]
    if not spaces:
        st.space()  # raises the "no embedding space yet" error
    if progress is not None:
        progress(f"report: {st.path} -> {out} (a line per stage follows)")
    with stage("imports", "loaded scikit-learn and FAISS"):
        import sklearn.manifold  # noqa: F401  (seconds on a cold start: timed on their own, not in a stage below)

        from .. import search  # noqa: F401
        from ..heads.protocol import model_names
    heads = model_names(models) if models is None or len(models) else []
    notes: list[str] = []
    max_points, queries, k = clamp_sizes(st, spaces, max_points, queries, k, notes)
    with stage("summary", "collection summary"):
        thumbs = Thumbnails(st, thumb_px)
        colors = label_colors(st.summary()["labels"])  # the names the store counts: no column read
        order = np.random.default_rng(seed).permutation(st.n_images)  # one sample, shared by every space
        query_rows = pick_queries(order, st, spaces, queries)
        sections = [section("summary", "collection", summary_data(st)),
                    section("failures", "failures", failures_data(st))]
    sampled: dict[str, Any] = {}
    projection: dict[str, str] = {}
    groups: dict[str, int] = {}
    agreement: dict[str, float | None] = {}
    for i, sp in enumerate(spaces):
        with stage("projection", f"2-D map of {sp.name}"):
            pos = sample_positions(sp, order, max_points)
            xy, projection[sp.name], how = project(sp.vectors[pos], seed)
        with stage("thumbnails", f"thumbnails of {sp.name}'s map"):
            thumbs.add(sp.rows[pos])
        with stage("neighbours", f"nearest neighbours in {sp.name}"):
            gallery, agreement[sp.name] = neighbours_data(st, sp, query_rows, k, thumbs, notes)
        with stage("duplicates", f"near-duplicates in {sp.name}"):
            dups = duplicates_data(st, sp, threshold, thumbs, notes)
            groups[sp.name] = dups.get("count", 0)
        sampled[sp.name] = {"map_points": int(len(pos)), "of": len(sp), "queries": len(query_rows)}
        sections.append(section(f"space-{i}", f"space {sp.name}", space_data(
            i, sp, xy, sp.rows[pos], sp.column("label", pos), colors, how, gallery, dups), kind="space"))
    with stage("classifiers", f"classifier heads ({', '.join(heads) or 'none'})"):
        report = run_classify(st, spaces, heads, seed, notes)
        sections.append(section("classifiers", "classifiers", classifier_data(report, heads, notes)))
    with stage("audit", "audit: label issues, outliers, leaks" if audit else "audit: not asked for"):
        labelled = audit and bool(st.summary()["labels"])  # label counts kept in the store: no column read
        audited = audit_data(st, spaces[0], thumbs, seed, threshold, notes) if labelled else None
        if audited is not None:
            sections.append(section("audit", "audit", audited))
    names = {sp.name for sp in spaces}
    pairs = [(st.spaces[sp.attrs["parent_space"]], sp) for sp in spaces if sp.attrs.get("parent_space") in names]
    if pairs:
        sections.append(section("finetune", "frozen vs fine-tuned", finetune_data(pairs, report, agreement)))
    notes += thumbs.notes()
    with stage("html", f"wrote {out}"):
        intro = {"sampled": sampled, "max_points": max_points, "queries": len(query_rows), "k": k, "seed": seed,
                 "max_failures": MAX_FAILURES_SHOWN, "max_groups": MAX_GROUPS_SHOWN}
        size = write_atomically(out, render_page(st, intro, sections, thumbs, notes, stages))
    stages["total"] = time.perf_counter() - t0
    seconds = {key: round(v, 3) for key, v in stages.items()}
    return {
        "path": str(out), "bytes": size, "store": str(st.path), "spaces": [sp.name for sp in spaces],
        "sections": [s["id"] for s in sections], "sampled": sampled, "projection": projection,
        "duplicate_groups": groups, "neighbour_label_agreement": agreement,
        "audit": None if audited is None else audited.get("counts"),
        "classifiers": None if report is None else {key: report.best[key] for key in ("space", "model", "accuracy")},
        "thumbnails": len(thumbs.uris), "missing_images": len(thumbs.missing),
        "changed_images": len(thumbs.changed), "notes": notes, "stages": seconds, "seconds": seconds,
    }


def section(sid: str, title: str, data: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    return {"id": sid, "title": title, "kind": kind or sid, "data": data}


def clamp_sizes(st: Store, spaces: list[Space], max_points: int, queries: int, k: int,
                notes: list[str]) -> tuple[int, int, int]:
    """Lower max_points, queries and k to what the store holds, before anything is allocated for them."""
    most = max(len(sp) for sp in spaces)
    new = (min(max_points, max(most, 1)), min(queries, most), min(k, max(most - 1, 1)))
    for name, old, value in zip(("queries", "k"), (queries, k), new[1:]):  # max_points is only a ceiling
        if value < old:
            notes.append(f"{name} lowered from {old} to {value}: the largest space holds {most} images")
    return new


# --------------------------------------------------------------------------- sampling and projection


def sample_positions(sp: Space, order: np.ndarray, n: int) -> np.ndarray:
    """Positions in the space of the first ``n`` store rows of ``order`` (a random permutation) it holds."""
    pos = sp.positions_of(order)
    return np.sort(pos[pos >= 0][:n])


def pick_queries(order: np.ndarray, st: Store, spaces: list[Space], n: int) -> list[int]:
    """``n`` store rows embedded in every space, in random order, taking the labels in turn."""
    common = order
    for sp in spaces:
        common = common[np.isin(common, sp.rows)]
    n = min(n, len(common))
    by_label: dict[str, list[int]] = {}
    candidates = common[: max(n * 50, 1000)]
    for row, label in zip(candidates.tolist(), st.image_column("label", candidates)):  # these rows' labels only
        by_label.setdefault(str(label), []).append(row)
    picked: list[int] = []
    for depth in range(n):
        picked += [rows[depth] for rows in by_label.values() if depth < len(rows)]
        if len(picked) >= n:
            break
    return picked[:n]


def project(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str, str]:
    """2-D coordinates of L2-normalised vectors: (xy, method, description).

    UMAP (cosine) when ``umap-learn`` is installed, else t-SNE from scikit-learn on at most 50 PCA
    components, on the CPU cores that are free; PCA for fewer than PCA_BELOW points.
    """
    from sklearn.decomposition import PCA

    X = l2_normalize(vectors)
    n = len(X)
    if n < 3:
        return np.zeros((n, 2)), "none", f"{n} point(s): no projection"
    if n < PCA_BELOW:
        xy = PCA(n_components=2, random_state=seed).fit_transform(X)
        return xy, "pca", f"PCA of {n} vectors (too few for t-SNE or UMAP)"
    try:
        from umap import UMAP  # optional: pip install umap-learn
    except ImportError:
        UMAP = None
    if UMAP is not None:
        with warnings.catch_warnings():  # a seeded UMAP runs single-threaded and says so
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            xy = UMAP(n_neighbors=min(15, n - 1), metric="cosine", random_state=seed).fit_transform(X)
        return np.asarray(xy), "umap", f"UMAP (umap-learn, cosine, {min(15, n - 1)} neighbours) of {n} vectors"
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    reduced = ""
    if X.shape[1] > 50:
        X = PCA(n_components=min(50, n), random_state=seed).fit_transform(X)
        reduced = f", after PCA to {X.shape[1]} dimensions"
    perplexity = min(30.0, (n - 1) / 3)
    with threadpool_limits(free_cores()):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500,
                  random_state=seed).fit_transform(X)
    return xy, "tsne", (f"t-SNE (scikit-learn, perplexity {perplexity:.0f}) of {n} vectors{reduced} "
                        "(install umap-learn for UMAP)")


# --------------------------------------------------------------------------- sections that search or classify


def neighbours_data(st: Store, sp: Space, query_rows: list[int], k: int, thumbs: Thumbnails,
                    notes: list[str]) -> tuple[dict[str, Any], float | None]:
    """Galleries of each query's k nearest neighbours (:func:`embedstore.search.search`), and the share
    of labelled neighbours that share their query's label."""
    from ..search import search

    if not query_rows:
        return {"skipped": "No query images asked for."}, None
    try:
        result = search(st, rows=query_rows, k=k, space=sp.name, exclude_self=True)
    except IndexFileError as e:
        notes.append(f"space {sp.name}: {e}; galleries use exact search")
        result = search(st, rows=query_rows, k=k, space=sp.name, exclude_self=True, exact=True)
    notes += [f"space {sp.name}: {n}" for n in result["notes"] if not n.startswith("no index")]
    labels = dict(zip(query_rows, st.image_column("label", query_rows)))  # the queries' labels only
    thumbs.add(query_rows + [h["row"] for hits in result["results"] for h in hits])
    same = total = 0
    rows = []
    for q, hits in zip(query_rows, result["results"]):
        cells = []
        for h in hits:  # the query itself left out by exclude_self
            match = bool(labels[q]) and h["label"] == labels[q]
            same, total = same + match, total + bool(labels[q] and h["label"])
            cells.append({"cls": "same" if match else "other" if labels[q] else "plain", "score": h["score"],
                          "label": h["label"] or "-", "img": thumbs.img(h["row"], f" (cosine {h['score']:.3f})")})
        rows.append({"img": thumbs.img(q), "label": str(labels[q]) or "-", "cells": cells})
    how = "exact search" if result["exact"] else f"index {result['index']['factory']}"
    return ({"skipped": None, "n_queries": len(query_rows), "k": k, "how": how, "same": same, "total": total, "rows": rows},
            same / total if total else None)


def duplicates_data(st: Store, sp: Space, threshold: float, thumbs: Thumbnails, notes: list[str]) -> dict[str, Any]:
    """Near-duplicate groups from :func:`embedstore.search.duplicates`, the largest first."""
    from ..search import duplicates

    try:
        result = duplicates(st, threshold=threshold, space=sp.name)
    except IndexFileError as e:
        notes.append(f"space {sp.name}: near-duplicates skipped: {e}")
        return {"skipped": str(e), "count": 0}
    notes += [f"space {sp.name}: {n}" for n in result["notes"] if not n.startswith("no index")]
    shown = result["groups"][:MAX_GROUPS_SHOWN]
    thumbs.add([m["row"] for g in shown for m in g["members"][:MAX_GROUP_MEMBERS]])
    groups = [{"size": g["size"], "min_score": g["min_score"], "more": max(0, g["size"] - MAX_GROUP_MEMBERS),
               "imgs": [thumbs.img(m["row"]) for m in g["members"][:MAX_GROUP_MEMBERS]]} for g in shown]
    return {"skipped": None, "count": len(result["groups"]), "threshold": threshold, "in_groups": result["in_groups"],
            "images": result["images"], "max_members": MAX_GROUP_MEMBERS, "groups": groups}


def run_classify(st: Store, spaces: list[Space], heads: list[str], seed: int, notes: list[str]) -> Any:
    """The classifier comparison (:func:`embedstore.heads.classify`), or None when it does not apply."""
    from ..heads import classify

    if not heads or len(st.summary()["labels"]) < 2:  # label counts kept in the store: no column read
        return None
    try:
        return classify(str(st.path), spaces=[sp.name for sp in spaces], models=heads, seed=seed)
    except EmbedstoreError as e:
        notes.append(f"classifier comparison skipped: {e}")
        return None


def classifier_data(report: Any, heads: list[str], notes: list[str]) -> dict[str, Any]:
    if report is None:
        why = ("no classifier heads asked for" if not heads else
               next((n for n in notes if n.startswith("classifier")), "the store has fewer than 2 labelled classes"))
        return {"why": why}
    ev, best = report.evaluation, report.best
    if report.protocol == "split":
        proto = f"trained on {ev['train']} train images, scored on {ev['eval']} {ev['eval_split']} images"
    else:
        proto = f"{ev['folds']}-fold stratified cross-validation over {ev['eval']} labelled images"
    rows = []
    for r in report.results:
        params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        rows.append(((r["space"], r["model"]) == (best["space"], best["model"]),
                     [r["space"], r["model"], f"{r['accuracy']:.4f}", f"{r['balanced_accuracy']:.4f}",
                      f"{r['macro_f1']:.4f}", f"{r['fit_s']:.3f}", params or "-"]))
    return {"why": None, "heads": ", ".join(heads), "protocol": proto, "rows": rows, "best": best,
            "matrix": confusion_data(best["confusion_matrix"], best["labels"])}


def confusion_data(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> dict[str, Any]:
    """Rows: true label, columns: predicted; shaded by the share of the row. The classes with most
    evaluation images, at most MAX_MATRIX_CLASSES."""
    cm = np.asarray(matrix, np.int64)
    keep = np.sort(np.argsort(-cm.sum(1), kind="stable")[:MAX_MATRIX_CLASSES])
    note = (f"The {len(keep)} classes with most evaluation images of {len(labels)} are shown."
            if len(keep) < len(labels) else "")
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    return {"keep": keep.tolist(), "labels": [str(x) for x in labels], "counts": cm.tolist(),
            "share": share.tolist(), "note": note}


# --------------------------------------------------------------------------- page


def environment() -> Any:
    """The Jinja2 environment of the package's report templates, autoescaping everything."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("embedstore.report", "templates"),
                              autoescape=jinja2.select_autoescape(("html", "j2")), undefined=jinja2.StrictUndefined,
                              trim_blocks=False, keep_trailing_newline=True)


def static_file(env: Any, name: str) -> Any:
    """A CSS or JS file of the templates folder, as markup to inline verbatim (it is ours, not the store's)."""
    import markupsafe

    return markupsafe.Markup(env.loader.get_source(env, name)[0])


def render_page(st: Store, intro: dict[str, Any], sections: list[dict[str, Any]], thumbs: Thumbnails,
                notes: list[str], stages: dict[str, float]) -> str:
    """The whole page: sections, the hover tooltip, the thumbnails as JSON (keyed by store row) and the JS."""
    rows = list(thumbs.uris)
    labels = st.image_column("label", rows)  # the rows with a thumbnail only
    env = environment()
    data = {str(r): [thumbs.uris[r], thumbs.paths[r], str(lab)] for r, lab in zip(rows, labels)}
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in stages.items() if k != "html")
    return env.get_template("report.html.j2").render(
        name=st.path.name, store_path=str(st.path), sections=sections, intro=intro, notes=notes,
        written=time.strftime("%Y-%m-%d %H:%M:%S"), timing=timing, thumbs=data,
        css=static_file(env, "report.css"), js=static_file(env, "report.js"))


def write_atomically(out: Path, page: str) -> int:
    """Write the page to a temporary file and rename it over ``out``; returns its size in bytes."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(out, page.encode("utf-8"))
    except OSError as e:
        raise EmbedstoreError(f"cannot write {out} ({e.strerror or e}): choose a writable --out location") from e
