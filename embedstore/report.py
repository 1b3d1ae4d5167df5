"""``report``: one self-contained HTML page that shows what is in a store.

Sections: the collection summary and its failures; per embedding space a 2-D map coloured by
label (thumbnails on hover), nearest-neighbour galleries and near-duplicate groups; the
classifier comparison with the best head's confusion matrix (labelled stores); frozen vs
fine-tuned spaces side by side. Everything is inline (JPEG thumbnails as ``data:`` URIs, SVG,
CSS, a little JS), so the file opens offline and can be mailed around. Large collections are
sampled (seeded) and the page says how.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import EmbedstoreError
from .store import Space, Store, open_store
from .utils import timed

PCA_BELOW = 25  # fewer points than this: PCA (t-SNE and UMAP need neighbourhoods)
MAX_FAILURES_SHOWN = 200
MAX_GROUPS_SHOWN = 12
MAX_GROUP_MEMBERS = 8
MAX_MATRIX_CLASSES = 40
MAX_LEGEND = 40
MAP_W, MAP_H, MAP_PAD = 720, 480, 12
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
           "#9edae5", "#393b79")
E = html.escape


# --------------------------------------------------------------------------- entry point


def write_report(store: str | os.PathLike | Store, out: str | os.PathLike, *,
                 space: str | Sequence[str] | None = None, max_points: int = 2000, queries: int = 8, k: int = 5,
                 models: str | Sequence[str] = "logreg,knn", threshold: float = 0.95, thumb_px: int = 72,
                 seed: int = 0) -> dict[str, Any]:
    """Write a self-contained HTML report of a store to ``out``.

    Args:
        store: the ``.h5`` store (path or open ``Store``).
        out: the HTML file to write (replaced atomically).
        space: a space name or list of names (default: every space).
        max_points: most images drawn on each space's map (a seeded random sample).
        queries: nearest-neighbour queries shown per space (the same images in every space).
        k: neighbours shown per query.
        models: classifier heads to compare (comma list, ``"all"``, or ``"none"`` to skip).
        threshold: cosine similarity at or above which images count as near-duplicates.
        thumb_px: longest side of the JPEG thumbnails.
        seed: seed of every sample and of the 2-D projection.

    Returns a JSON-ready summary: ``path``, ``bytes``, ``sections``, ``sampled`` (map points and
    queries per space), ``projection`` (method per space), ``missing_images``, ``notes`` and
    ``seconds`` per stage.
    """
    from .classify import parse_models

    if max_points < 1 or queries < 0 or k < 1 or not -1 <= threshold <= 1:
        raise ValueError("max_points and k must be at least 1, queries at least 0 and threshold in [-1, 1]")
    heads = [] if models in ("none", "") or (not isinstance(models, str) and not models) else parse_models(models)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    with timed(stages, "open_store"):
        st = store if isinstance(store, Store) else open_store(store)
        spaces = [st.space(n) for n in ([space] if isinstance(space, str) else space or list(st.spaces))]
    if not spaces:
        st.space()  # raises the "no embedding space yet" error
    thumbs = Thumbnails(st, thumb_px)
    colors = label_colors(st.images["label"])
    order = np.random.default_rng(seed).permutation(st.n_images)  # one sample, shared by every space
    query_rows = pick_queries(order, st, spaces, queries)
    notes: list[str] = []
    sections = [("summary", "collection", summary_section(st)), ("failures", "failures", failures_section(st))]
    sampled: dict[str, Any] = {}
    projection: dict[str, str] = {}
    groups: dict[str, int] = {}
    agreement: dict[str, float | None] = {}
    for i, sp in enumerate(spaces):
        with timed(stages, "projection"):
            pos = sample_positions(sp, order, max_points)
            xy, projection[sp.name], how = project(sp.vectors[pos], seed)
        with timed(stages, "thumbnails"):
            thumbs.add(sp.rows[pos])
        with timed(stages, "neighbours"):
            gallery, agreement[sp.name] = neighbours_html(st, sp, query_rows, k, thumbs, notes)
        with timed(stages, "duplicates"):
            dups, groups[sp.name] = duplicates_html(st, sp, threshold, thumbs, notes)
        sampled[sp.name] = {"map_points": int(len(pos)), "of": len(sp), "queries": len(query_rows)}
        sections.append((f"space-{i}", f"space {sp.name}",
                         space_section(i, sp, xy, sp.rows[pos], sp.labels[pos], colors, how, gallery, dups)))
    with timed(stages, "classifiers"):
        report = run_classify(st, spaces, heads, seed, notes)
        sections.append(("classifiers", "classifiers", classifier_section(report, heads, notes)))
    names = {sp.name for sp in spaces}
    pairs = [(st.spaces[sp.attrs["parent_space"]], sp) for sp in spaces if sp.attrs.get("parent_space") in names]
    if pairs:
        sections.append(("finetune", "frozen vs fine-tuned", finetune_section(pairs, report, agreement)))
    with timed(stages, "html"):
        intro = intro_html(sampled, max_points, len(query_rows), k, seed)
        size = write_atomically(Path(out), render_page(st, intro, sections, thumbs, notes, stages))
    stages["total"] = time.perf_counter() - t0
    return {
        "path": str(out), "bytes": size, "store": str(st.path), "spaces": [sp.name for sp in spaces],
        "sections": [sid for sid, _, _ in sections], "sampled": sampled, "projection": projection,
        "duplicate_groups": groups, "neighbour_label_agreement": agreement,
        "classifiers": None if report is None else {key: report.best[key] for key in ("space", "model", "accuracy")},
        "thumbnails": len(thumbs.uris), "missing_images": len(thumbs.missing), "notes": notes,
        "seconds": {key: round(v, 3) for key, v in stages.items()},
    }


# --------------------------------------------------------------------------- sampling and projection


def sample_positions(sp: Space, order: np.ndarray, n: int) -> np.ndarray:
    """Positions in the space of the first ``n`` store rows of ``order`` (a random permutation) it holds."""
    rows = order[np.isin(order, sp.rows)][:n]
    return np.sort(np.searchsorted(sp.rows, rows))


def pick_queries(order: np.ndarray, st: Store, spaces: list[Space], n: int) -> list[int]:
    """``n`` store rows embedded in every space, in random order, taking the labels in turn."""
    common = order
    for sp in spaces:
        common = common[np.isin(common, sp.rows)]
    by_label: dict[str, list[int]] = {}
    for row in common[: max(n * 50, 1000)]:
        by_label.setdefault(str(st.images["label"][row]), []).append(int(row))
    picked: list[int] = []
    for depth in range(n):
        picked += [rows[depth] for rows in by_label.values() if depth < len(rows)]
    return picked[:n]


def project(vectors: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str, str]:
    """2-D coordinates of L2-normalised vectors: (xy, method, description).

    UMAP (cosine) when ``umap-learn`` is installed, else t-SNE from scikit-learn on at most 50 PCA
    components; PCA for fewer than PCA_BELOW points.
    """
    from sklearn.decomposition import PCA

    X = np.asarray(vectors, np.float32)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
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

    reduced = ""
    if X.shape[1] > 50:
        X = PCA(n_components=min(50, n), random_state=seed).fit_transform(X)
        reduced = f", after PCA to {X.shape[1]} dimensions"
    perplexity = min(30.0, (n - 1) / 3)
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed).fit_transform(X)
    return xy, "tsne", (f"t-SNE (scikit-learn, perplexity {perplexity:.0f}) of {n} vectors{reduced} "
                        "(install umap-learn for UMAP)")


# --------------------------------------------------------------------------- thumbnails


def thumbnail_jpeg(path: str, px: int) -> bytes | None:
    """A small JPEG of an image file, or None when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * px, 2 * px))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=75, optimize=True)
            return buf.getvalue()
    except Exception:  # any unreadable or missing file gets the placeholder; one bad file must not stop a report
        return None


def placeholder_jpeg(px: int) -> bytes:
    """A grey square with a cross: stands for an image file that is missing or unreadable."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (px, px), (225, 225, 225))
    d = ImageDraw.Draw(im)
    d.line([(8, 8), (px - 9, px - 9)], fill=(160, 160, 160), width=3)
    d.line([(8, px - 9), (px - 9, 8)], fill=(160, 160, 160), width=3)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=75)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class Thumbnails:
    """Data URIs of store rows' thumbnails, made once per row (in threads: Pillow decodes without the GIL)."""

    def __init__(self, st: Store, px: int) -> None:
        self.st, self.px = st, px
        self.uris: dict[int, str] = {}
        self.missing: set[int] = set()
        self._placeholder = data_uri(placeholder_jpeg(px))

    def add(self, rows: Sequence[int]) -> None:
        todo = list(dict.fromkeys(int(r) for r in rows if int(r) not in self.uris))
        if not todo:
            return
        paths = [self.st.abspath(str(self.st.images["path"][r])) for r in todo]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for row, jpeg in zip(todo, pool.map(lambda p: thumbnail_jpeg(p, self.px), paths)):
                if jpeg is None:
                    self.missing.add(row)
                self.uris[row] = self._placeholder if jpeg is None else data_uri(jpeg)

    def img(self, row: int, caption: str = "") -> str:
        """An ``<img>`` of a row with its path (and caption) as tooltip; placeholders are marked."""
        self.add([row])
        path = str(self.st.images["path"][row])
        if row in self.missing:
            return (f'<img src="{self.uris[row]}" alt="{E(path)}" class="missing" '
                    f'title="{E(path + " (image file missing or unreadable)" + caption)}">')
        return f'<img src="{self.uris[row]}" alt="{E(path)}" title="{E(path + caption)}">'


def label_colors(labels: np.ndarray) -> dict[str, str]:
    names = sorted({str(x) for x in labels if x})
    out = {"": "#9a9a9a"}
    for i, name in enumerate(names):
        out[name] = PALETTE[i] if i < len(PALETTE) else f"hsl({(i * 137) % 360},60%,45%)"
    return out


# --------------------------------------------------------------------------- sections


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], attrs: str = "") -> str:
    head = "".join(f"<th>{E(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{E(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_section(st: Store) -> str:
    s = st.summary()
    counts = lambda d: ", ".join(f"{E(str(k))} ({v})" for k, v in d.items()) or "none"  # noqa: E731
    spaces = _table(["space", "backbone", "dim", "rows", "dtype", "parent space", "created"],
                    [[x["name"], x["backbone"], x["dim"], x["rows"], x["dtype"],
                      st.spaces[x["name"]].attrs.get("parent_space", "-"), x["created"]] for x in s["spaces"]],
                    'id="spaces-table"')
    journal = (f"<p>{s['journal_parts']} journal part(s) not yet folded in (a run is going or was killed).</p>"
               if s["journal_parts"] else "")
    return (f'<section id="summary"><h2>Collection</h2><p><b>{s["images"]}</b> images under <code>{E(s["root"])}'
            f'</code>, <b>{s["failures"]}</b> failures.</p><p>Labels: {counts(s["labels"])}</p>'
            f"<p>Splits: {counts(s['splits'])}</p>{journal}{spaces}</section>")


def failures_section(st: Store) -> str:
    rows = [[f["path"], f["space"], f["error"], f["message"]] for f in st.failures[:MAX_FAILURES_SHOWN]]
    shown = f" (first {MAX_FAILURES_SHOWN} shown)" if len(st.failures) > MAX_FAILURES_SHOWN else ""
    table = _table(["path", "space", "error", "message"], rows, 'id="failures-table"') if rows else ""
    return (f'<section id="failures"><h2>Failures</h2><p>{len(st.failures)} image(s) could not be embedded{shown}.'
            f"</p>{table}</section>")


def map_svg(i: int, sp: Space, xy: np.ndarray, rows: np.ndarray, labels: np.ndarray, colors: dict[str, str]) -> str:
    """An SVG scatter, one ``circle.pt`` per sampled row (``data-row`` finds its thumbnail)."""
    lo, hi = (xy.min(0), xy.max(0)) if len(xy) else (np.zeros(2), np.ones(2))
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    px = MAP_PAD + (xy - lo) / span * [MAP_W - 2 * MAP_PAD, MAP_H - 2 * MAP_PAD]
    r = 4 if len(xy) <= 500 else 3
    dots = "".join(f'<circle class="pt" cx="{x:.1f}" cy="{MAP_H - y:.1f}" r="{r}" fill="{colors[str(lab)]}" '
                   f'data-row="{int(row)}"/>' for (x, y), row, lab in zip(px, rows, labels))
    return (f'<svg class="map" id="map-{i}" data-space="{E(sp.name)}" data-points="{len(rows)}" '
            f'viewBox="0 0 {MAP_W} {MAP_H}" width="{MAP_W}" height="{MAP_H}" role="img" '
            f'aria-label="2-D map of space {E(sp.name)}">{dots}</svg>')


def space_section(i: int, sp: Space, xy: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                  colors: dict[str, str], how: str, gallery: str, dups: str) -> str:
    names, counts = np.unique(np.asarray([str(x) for x in labels], dtype=object), return_counts=True)
    top = np.argsort(-counts, kind="stable")[:MAX_LEGEND]
    legend = "".join(f'<li><span class="sw" style="background:{colors[names[j]]}"></span>'
                     f'{E(names[j] or "(no label)")} ({counts[j]})</li>' for j in sorted(top))
    if len(names) > MAX_LEGEND:
        legend += f"<li>and {len(names) - MAX_LEGEND} more labels</li>"
    sampled = f"a seeded random sample of {len(rows)} of its {len(sp)} images" if len(rows) < len(sp) \
        else f"all {len(sp)} images"
    return (f'<section id="space-{i}" class="space"><h2>Space <code>{E(sp.name)}</code></h2>'
            f'<p>{E(str(sp.attrs.get("backbone")))}, {sp.dim} dimensions.</p>'
            f'<h3>Map</h3><p class="how">{E(how)}; {sampled}. Hover a point to see its image.</p>'
            f'<div class="mapbox">{map_svg(i, sp, xy, rows, labels, colors)}<ul class="legend">{legend}</ul></div>'
            f"<h3>Nearest neighbours</h3>{gallery}<h3>Near-duplicates</h3>{dups}</section>")


def neighbours_html(st: Store, sp: Space, query_rows: list[int], k: int, thumbs: Thumbnails,
                    notes: list[str]) -> tuple[str, float | None]:
    """Galleries of each query's k nearest neighbours (:func:`embedstore.search.search`), and the share
    of labelled neighbours that share their query's label."""
    from .index import IndexFileError
    from .search import search

    if not query_rows:
        return "<p>No query images asked for.</p>", None
    try:
        result = search(st, rows=query_rows, k=k + 1, space=sp.name)
    except IndexFileError as e:
        notes.append(f"space {sp.name}: {e}; galleries use exact search")
        result = search(st, rows=query_rows, k=k + 1, space=sp.name, exact=True)
    notes += [f"space {sp.name}: {n}" for n in result["notes"] if not n.startswith("no index")]
    labels = st.images["label"]
    thumbs.add(query_rows + [h["row"] for hits in result["results"] for h in hits])
    same = total = 0
    rows_html = []
    for q, hits in zip(query_rows, result["results"]):
        hits = [h for h in hits if h["row"] != q][:k]
        cells = []
        for h in hits:
            match = bool(labels[q]) and h["label"] == labels[q]
            same, total = same + match, total + bool(labels[q] and h["label"])
            img = thumbs.img(h["row"], f" (cosine {h['score']:.3f})")
            cls = "same" if match else "other" if labels[q] else "plain"
            cells.append(f'<figure class="{cls}">{img}<figcaption>{h["score"]:.3f}<br>'
                         f'{E(h["label"] or "-")}</figcaption></figure>')
        rows_html.append(f'<div class="gallery"><figure class="query">{thumbs.img(q)}<figcaption>query<br>'
                         f'{E(str(labels[q]) or "-")}</figcaption></figure>{"".join(cells)}</div>')
    share = same / total if total else None
    how = "exact search" if result["exact"] else f"index {result['index']['factory']}"
    agree = f" {same} of {total} labelled neighbours ({share:.0%}) share their query's label." if total else ""
    return (f'<p>{len(query_rows)} query images (the same in every space; classes taken in turn), {k} nearest '
            f'neighbours each by cosine similarity ({E(how)}); green: same label.{agree}</p>'
            + "".join(rows_html)), share


def duplicates_html(st: Store, sp: Space, threshold: float, thumbs: Thumbnails, notes: list[str]) -> tuple[str, int]:
    """Near-duplicate groups from :func:`embedstore.search.duplicates`, the largest first."""
    from .index import IndexFileError
    from .search import duplicates

    try:
        result = duplicates(st, threshold=threshold, space=sp.name)
    except IndexFileError as e:
        notes.append(f"space {sp.name}: near-duplicates skipped: {e}")
        return f"<p>Skipped: {E(str(e))}</p>", 0
    notes += [f"space {sp.name}: {n}" for n in result["notes"] if not n.startswith("no index")]
    groups = result["groups"]
    shown = groups[:MAX_GROUPS_SHOWN]
    parts = [f'<p>{len(groups)} group(s) of images at cosine similarity &ge; {threshold} ({result["in_groups"]} of '
             f'{result["images"]} images)' + (f"; the {len(shown)} largest shown" if len(groups) > len(shown) else "")
             + f", at most {MAX_GROUP_MEMBERS} images per group.</p>"]
    thumbs.add([m["row"] for g in shown for m in g["members"][:MAX_GROUP_MEMBERS]])
    for g in shown:
        imgs = "".join(thumbs.img(m["row"]) for m in g["members"][:MAX_GROUP_MEMBERS])
        more = f"<span>+{g['size'] - MAX_GROUP_MEMBERS} more</span>" if g["size"] > MAX_GROUP_MEMBERS else ""
        parts.append(f'<div class="gallery dup"><span>{g["size"]} images, lowest cosine {g["min_score"]:.3f}</span>'
                     f"{imgs}{more}</div>")
    return "".join(parts), len(groups)


def run_classify(st: Store, spaces: list[Space], heads: list[str], seed: int, notes: list[str]) -> Any:
    """The classifier comparison (:func:`embedstore.classify.classify`), or None when it does not apply."""
    from .classify import classify

    if not heads or len({str(x) for x in st.images["label"] if x}) < 2:
        return None
    try:
        return classify(str(st.path), spaces=[sp.name for sp in spaces], models=heads, seed=seed)
    except EmbedstoreError as e:
        notes.append(f"classifier comparison skipped: {e}")
        return None


def classifier_section(report: Any, heads: list[str], notes: list[str]) -> str:
    if report is None:
        why = ("no classifier heads asked for" if not heads else
               next((n for n in notes if n.startswith("classifier")), "the store has fewer than 2 labelled classes"))
        return f'<section id="classifiers"><h2>Classifiers</h2><p>Not run: {E(why)}.</p></section>'
    ev, best = report.evaluation, report.best
    if report.protocol == "split":
        proto = f"trained on {ev['train']} train images, scored on {ev['eval']} {ev['eval_split']} images"
    else:
        proto = f"{ev['folds']}-fold stratified cross-validation over {ev['eval']} labelled images"
    rows = []
    for r in report.results:
        cls = ' class="best"' if (r["space"], r["model"]) == (best["space"], best["model"]) else ""
        params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        cells = [r["space"], r["model"], f"{r['accuracy']:.4f}", f"{r['balanced_accuracy']:.4f}",
                 f"{r['macro_f1']:.4f}", f"{r['fit_s']:.3f}", params or "-"]
        rows.append(f"<tr{cls}>" + "".join(f"<td>{E(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("space", "model", "accuracy", "balanced acc.", "macro-F1", "fit s",
                                               "chosen"))
    return (f'<section id="classifiers"><h2>Classifiers</h2><p>Heads {E(", ".join(heads))} on the cached vectors: '
            f"{proto} (<code>embedstore classify</code> compares more heads).</p>"
            f'<table id="classifier-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f"<h3>Confusion matrix of the best head: {E(best['space'])} / {E(best['model'])} "
            f"(accuracy {best['accuracy']:.4f})</h3>{confusion_html(best['confusion_matrix'], best['labels'])}"
            "</section>")


def confusion_html(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """A heatmap table, rows: true label, columns: predicted; shade by the share of the row."""
    cm = np.asarray(matrix, np.int64)
    keep = np.sort(np.argsort(-cm.sum(1), kind="stable")[:MAX_MATRIX_CLASSES])
    note = (f"<p>The {len(keep)} classes with most evaluation images of {len(labels)} are shown.</p>"
            if len(keep) < len(labels) else "")
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    head = "".join(f"<th>{E(str(labels[j]))}</th>" for j in keep)
    body = "".join(f"<tr><th>{E(str(labels[i]))}</th>" + "".join(
        f'<td style="background:rgba(31,119,180,{share[i, j]:.2f});color:{"#fff" if share[i, j] > .55 else "#000"}"'
        f">{cm[i, j]}</td>" for j in keep) + "</tr>" for i in keep)
    return (f'{note}<table id="confusion-matrix" class="confusion"><thead><tr><th>true \\ predicted</th>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table>")


def finetune_section(pairs: list[tuple[Space, Space]], report: Any, agreement: dict[str, float | None]) -> str:
    """Per (frozen, fine-tuned) pair: head accuracies and neighbour label agreement side by side, and the
    training run recorded in the fine-tuned space's attrs."""
    acc = {} if report is None else {(r["space"], r["model"]): r["accuracy"] for r in report.results}
    models = [] if report is None else list(dict.fromkeys(r["model"] for r in report.results))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    listed = lambda v: ", ".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    parts = ['<section id="finetune"><h2>Frozen vs fine-tuned</h2>']
    for frozen, tuned in pairs:
        measures = [(f"{m} accuracy", acc.get((frozen.name, m)), acc.get((tuned.name, m))) for m in models]
        measures.append(("neighbours sharing the query's label", agreement.get(frozen.name), agreement.get(tuned.name)))
        rows = [[what, fmt(a), fmt(b), "-" if a is None or b is None else f"{b - a:+.4f}"] for what, a, b in measures]
        ft = tuned.attrs.get("finetune") or {}
        training = "; ".join(f"{key}: {listed(ft[key])}" for key in (
            "method", "trained_stages", "epochs_run", "best_epoch", "best_val_accuracy", "frozen_probe_val_accuracy",
            "train_images") if key in ft)
        parts.append(f"<h3><code>{E(frozen.name)}</code> &rarr; <code>{E(tuned.name)}</code></h3>"
                     f"<p>Training run: {E(training) or 'not recorded'}.</p>"
                     + _table(["measure", "frozen", "fine-tuned", "change"], rows, 'class="finetune-table"'))
    return "".join(parts) + "</section>"


def intro_html(sampled: dict[str, Any], max_points: int, n_queries: int, k: int, seed: int) -> str:
    maps = "; ".join(f"{E(n)}: {s['map_points']} of {s['of']}" for n, s in sampled.items())
    return (f'<p id="sampling">Sampled (seed {seed}): map points per space, at most {max_points} ({maps}); '
            f"{n_queries} neighbour queries with {k} neighbours each; near-duplicates and classifiers use every "
            f"image; at most {MAX_FAILURES_SHOWN} failures and {MAX_GROUPS_SHOWN} duplicate groups are listed.</p>")


# --------------------------------------------------------------------------- page


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#222}
h1{margin-top:20px}h2{border-bottom:1px solid #ddd;padding-top:12px}code{font-size:90%}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:left}
tr.best td{background:#e8f4e8;font-weight:600}.confusion td{text-align:right;min-width:28px}
.mapbox{display:flex;gap:16px;align-items:flex-start}svg.map{border:1px solid #ddd;background:#fcfcfc}
svg.map circle{stroke:#fff;stroke-width:.6;cursor:pointer}svg.map circle:hover{stroke:#000;stroke-width:1.5}
.legend{list-style:none;padding:0;margin:0}.sw{display:inline-block;width:12px;height:12px;margin-right:6px}
.gallery{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:6px 0}
figure{margin:0;text-align:center;font-size:11px;border:3px solid transparent}
figure.query{border-color:#555}figure.same{border-color:#4caf50}figure.other{border-color:#e57373}
.dup>span{font-size:12px;align-self:center;margin-right:6px}img.missing{outline:1px dashed #c00}
#tip{position:absolute;background:#fff;border:1px solid #888;padding:4px;font-size:12px;pointer-events:none;
box-shadow:0 2px 6px rgba(0,0,0,.25);max-width:260px;word-break:break-all}#tip[hidden]{display:none}
.how,#sampling,footer{color:#555}
"""

# Hover thumbnails, and a self-check a headless browser can read back from <body data-*>. Opened as
# report.html#selfcheck, the page also loads every hover thumbnail, which the load event waits for.
JS = """
(function () {
  "use strict";
  var thumbs = JSON.parse(document.getElementById("thumbs").textContent);
  var tip = document.getElementById("tip"), tipImg = document.getElementById("tip-img");
  var tipText = document.getElementById("tip-text");
  function isPoint(t) { return t.classList && t.classList.contains("pt"); }
  function show(ev) {
    if (!isPoint(ev.target)) return;
    var info = thumbs[ev.target.getAttribute("data-row")];
    if (!info) return;
    tipImg.src = info[0];
    tipText.textContent = info[2] ? info[1] + " (" + info[2] + ")" : info[1];
    tip.style.left = (ev.pageX + 14) + "px";
    tip.style.top = (ev.pageY + 14) + "px";
    tip.hidden = false;
  }
  function hide(ev) { if (isPoint(ev.target)) tip.hidden = true; }
  document.querySelectorAll("svg.map").forEach(function (svg) {
    svg.addEventListener("mouseover", show);
    svg.addEventListener("mouseout", hide);
  });
  var selfcheck = location.hash === "#selfcheck";
  if (selfcheck) {
    var box = document.createElement("div");
    box.hidden = true;
    Object.keys(thumbs).forEach(function (key) {
      var im = new Image();
      im.className = "selfcheck";
      im.src = thumbs[key][0];
      box.appendChild(im);
    });
    document.body.appendChild(box);
  }
  function count(images) {
    var ok = 0;
    images.forEach(function (im) { if (im.complete && im.naturalWidth > 0) ok++; });
    return [ok, images.length - ok];
  }
  window.addEventListener("load", function () {
    var b = document.body.dataset;
    var page = count(Array.prototype.filter.call(document.querySelectorAll("img[src]"), function (im) {
      return im !== tipImg && !im.classList.contains("selfcheck");
    }));
    b.imagesOk = page[0];
    b.imagesBroken = page[1];
    if (selfcheck) {
      var hover = count(Array.prototype.slice.call(document.querySelectorAll("img.selfcheck")));
      b.thumbsOk = hover[0];
      b.thumbsBroken = hover[1];
    }
    b.mapPoints = document.querySelectorAll("svg.map circle.pt").length;
    var first = document.querySelector("svg.map circle.pt");
    if (first) {
      first.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
      var shown = !tip.hidden && tipImg.src.indexOf("data:image/jpeg;base64,") === 0;
      first.dispatchEvent(new MouseEvent("mouseout", {bubbles: true}));
      b.hover = shown && tip.hidden ? "ok" : "failed";
    } else {
      b.hover = "none";
    }
    b.ready = "1";
  });
})();
"""


def render_page(st: Store, intro: str, sections: list[tuple[str, str, str]], thumbs: Thumbnails,
                notes: list[str], stages: dict[str, float]) -> str:
    """The whole page: sections, the hover tooltip, the thumbnails as JSON (keyed by store row) and the JS."""
    labels, paths = st.images["label"], st.images["path"]
    data = {str(r): [uri, str(paths[r]), str(labels[r])] for r, uri in thumbs.uris.items()}
    data_json = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # no "</script>" inside
    nav = " &middot; ".join(f'<a href="#{sid}">{E(title)}</a>' for sid, title, _ in sections)
    note_html = f'<ul id="notes">{"".join(f"<li>{E(n)}</li>" for n in notes)}</ul>' if notes else ""
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in stages.items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>embedstore report: '
            f"{E(st.path.name)}</title><style>{CSS}</style></head><body>"
            f"<h1>embedstore report: <code>{E(st.path.name)}</code></h1><nav>{nav}</nav>{intro}{note_html}"
            + "".join(html_ for _, _, html_ in sections)
            + f"<footer><p>Written {time.strftime('%Y-%m-%d %H:%M:%S')} from <code>{E(str(st.path))}</code> "
            f"({timing}).</p></footer>"
            '<div id="tip" hidden><img id="tip-img" alt=""><div id="tip-text"></div></div>'
            f'<script type="application/json" id="thumbs">{data_json}</script><script>{JS}</script></body></html>\n')


def write_atomically(out: Path, page: str) -> int:
    """Write the page to a temporary file and rename it over ``out``; returns its size in bytes."""
    data = page.encode("utf-8")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EmbedstoreError(f"cannot write {out} ({e.strerror or e}): choose a writable --out location") from e
    return len(data)


