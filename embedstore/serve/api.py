"""The search server's JSON routes: search and predict (by rows, paths, vectors, texts or an
uploaded image), the store's info, and row images.

Every route answers from one consistent snapshot of the served store (``ServedStore.space``);
searching is ``embedstore.search.search`` itself, given the index the server keeps loaded, so a
served query and ``embedstore search`` return the same hits. Routes are plain functions: FastAPI
runs them in its thread pool, and image queries meet in the backbone's micro-batcher.

Crash safety: reads only; nothing here writes a file.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response

from .._hashing import hash_bytes
from ..backbones.registry import has_backbone, has_text_tower
from ..errors import NotFoundError, QueryError, UploadTooLargeError
from ..search.query import path_rows, row_positions, search
from ..search.rows import rows_with_hashes
from .media import Thumbnails, check_row, row_image
from .models import PredictRequest, PredictResponse, QueryRequest, SearchRequest, SearchResponse, Where
from .state import ServedStore

router = APIRouter(prefix="/api")
thumbnails = Thumbnails()


def served(request: Request) -> ServedStore:
    return request.app.state.served


def _check_query(req: QueryRequest, limit: int) -> None:
    kinds = req.kinds()
    if len(kinds) != 1:
        raise QueryError(f"give exactly one kind of query: rows, paths, vectors or texts (got {', '.join(kinds) or 'none'})")
    n = len(getattr(req, kinds[0]))
    if not 1 <= n <= limit:
        raise QueryError(f"{n} {kinds[0]} given: a request takes 1 to {limit} queries")


def _vectors(req: QueryRequest, dim: int) -> np.ndarray:
    q = np.asarray(req.vectors, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != dim:
        lengths = sorted({len(v) for v in req.vectors or []})
        raise QueryError(f"vectors must each have {dim} numbers (the space's dimension), not {lengths}")
    bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
    if len(bad):
        raise QueryError(f"vector {int(bad[0])} has NaN or infinite values: give finite numbers")
    zero = np.flatnonzero(~q.any(axis=1))
    if len(zero):
        raise QueryError(f"vector {int(zero[0])} is all zeros: it has no direction to compare by cosine")
    return q.astype(np.float32)


def _search(srv: ServedStore, space: str | None, k: int, offset: int, where: dict[str, str], exact: bool,
            exclude_self: bool, **query: Any) -> dict[str, Any]:
    """``search`` on the snapshot, asking for offset + k hits and returning the page asked for."""
    limit = srv.options.max_k
    if k + offset > limit:
        raise QueryError(f"k + offset = {k + offset} is over this server's limit of {limit} hits per query "
                         "(start it with a larger --max-k)")
    st, sp, index = srv.space(space)
    selves: list[set[int]] = query.pop("selves", None) or []
    extra = max((len(s) for s in selves), default=0)
    with srv.read_lock:
        out = search(st, k=k + offset + extra, space=sp.name, where=where, exact=exact, index=index,
                     exclude_self=exclude_self and not selves, **query)
    results = out["results"]
    if selves:
        results = [[h for h in hits if h["row"] not in own] for hits, own in zip(results, selves)]
    out["results"] = [hits[offset: offset + k] for hits in results]
    available = out["available"] - extra
    out.update(k=k, offset=offset, generation=st.generation, exclude_self=exclude_self, available=available,
               more=offset + k < available)
    return out


@router.post("/search", response_model=SearchResponse, summary="Search by rows, paths, vectors or texts")
def search_json(req: SearchRequest, request: Request) -> dict[str, Any]:
    """The k nearest neighbours (cosine) of stored rows, stored paths, raw vectors or texts."""
    srv = served(request)
    _check_query(req, srv.options.max_queries)
    where = req.where.as_dict() if req.where else {}
    common = dict(space=req.space, k=req.k, offset=req.offset, where=where, exact=req.exact,
                  exclude_self=req.exclude_self)
    if req.texts is not None:
        from ..embedding.text import check_text_space

        _, sp, _ = srv.space(req.space)
        check_text_space(sp)  # before any backbone is loaded
        q = srv.model(sp).embed_texts(req.texts)
        out = _search(srv, vectors=q, **common)
        out["queries"] = [{"query": f"text: {t}"} for t in req.texts]
        return out
    if req.vectors is not None:
        _, sp, _ = srv.space(req.space)
        return _search(srv, vectors=_vectors(req, sp.dim), **common)
    return _search(srv, rows=req.rows, paths=req.paths, **common)


def _upload(file: UploadFile, limit: int) -> bytes:
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLargeError(f"{file.filename or 'the upload'} is over this server's limit of {limit} bytes "
                                  "(start it with a larger --max-upload)")
    return data


@router.post("/search/image", response_model=SearchResponse, summary="Search by an uploaded image")
def search_image(request: Request, file: UploadFile = File(..., description="a JPEG, PNG, WebP, ... image"),
                 k: int = Query(10, ge=1), offset: int = Query(0, ge=0), space: str | None = None,
                 label: str | None = None, split: str | None = None, path: str | None = None,
                 exclude_self: bool = False, exact: bool = False) -> dict[str, Any]:
    """The k nearest neighbours of an uploaded image, embedded with the space's own backbone.

    exclude_self leaves out the stored rows whose content is byte-for-byte this upload (found by a
    scan of the space's content hashes: it costs a read of that column)."""
    srv = served(request)
    name = file.filename or "upload"
    data = _upload(file, srv.options.max_upload_bytes)
    _, sp, _ = srv.space(space)
    q = srv.model(sp).embed_images([data], [name])
    selves = None
    if exclude_self:
        digest = hash_bytes(data)
        with srv.read_lock:
            selves = [rows_with_hashes(sp, [digest]).get(digest, set())]
    where = Where(label=label, split=split, path=path).as_dict()
    out = _search(srv, space=sp.name, k=k, offset=offset, where=where, exact=exact, exclude_self=exclude_self,
                  vectors=q, selves=selves)
    out["queries"] = [{"query": name}]
    return out


def _predict(srv: ServedStore, head_name: str, top_k: int, X: np.ndarray, names: list[str]) -> dict[str, Any]:
    head = srv.heads[head_name]
    tops = head.top_k(X, top_k)
    return {"head": head_name, "space": head.space, "model": head.model,
            "predictions": [{"query": n, "label": t[0][0], "probability": round(t[0][1], 6),
                             "top": [{"label": lab, "p": round(p, 6)} for lab, p in t]} for n, t in zip(names, tops)]}


def _head(srv: ServedStore, name: str) -> Any:
    if name not in srv.heads:
        raise NotFoundError(f"no head {name!r} on this server: it has {', '.join(srv.heads) or 'none'} "
                            "(start it with --head NAME=DIR)")
    return srv.heads[name]


@router.post("/predict", response_model=PredictResponse, summary="Label rows, paths or vectors with a saved head")
def predict_json(req: PredictRequest, request: Request) -> dict[str, Any]:
    """Labels of stored rows, stored paths or raw vectors by a saved head (lineage checked)."""
    srv = served(request)
    _check_query(req, srv.options.max_queries)
    head = _head(srv, req.head)
    st, sp, _ = srv.space(req.space or head.space)
    head.check_space(sp.attrs, f"space {sp.name!r} of {st.path}")
    if req.texts is not None:
        raise QueryError("a head labels images, rows, paths or vectors, not texts")
    if req.vectors is not None:
        X, names = _vectors(req, sp.dim), [f"vector {i}" for i in range(len(req.vectors))]
    else:
        rows = req.rows if req.rows is not None else path_rows(st, req.paths or [])
        X = np.asarray(sp.vectors[row_positions(sp, rows)], np.float32)
        names = list(req.paths) if req.paths is not None else [f"row {r}" for r in rows]
    return _predict(srv, req.head, req.top_k, X, names)


@router.post("/predict/image", response_model=PredictResponse, summary="Label an uploaded image with a saved head")
def predict_image(request: Request, head: str, file: UploadFile = File(...),
                  top_k: int = Query(3, ge=1, le=1000)) -> dict[str, Any]:
    """The head's labels of an uploaded image, embedded with the head's space's backbone."""
    srv = served(request)
    h = _head(srv, head)
    data = _upload(file, srv.options.max_upload_bytes)
    _, sp, _ = srv.space(h.space)
    X = srv.model(sp).embed_images([data], [file.filename or "upload"], normalize=False)
    return _predict(srv, head, top_k, X, [file.filename or "upload"])


@router.get("/info", summary="The store, its spaces, indexes and heads")
def info(request: Request) -> dict[str, Any]:
    """What is served: the store summary, each space's index and query kinds, heads, limits."""
    srv = served(request)
    st, indexes = srv.snapshot()
    out = st.summary()
    for s in out["spaces"]:
        sp, idx = st.space(s["name"]), indexes.get(s["name"])
        s["image_queries"] = has_backbone(sp.attrs)
        s["text_queries"] = has_text_tower(sp.attrs)
        s["index"] = None if idx is None else {key: idx.info.get(key) for key in ("kind", "factory", "rows",
                                                                                  "recall_at_10", "params")}
        s["index_building"] = s["name"] in srv.building
    out["default_space"] = next(iter(st.spaces), None)
    out["heads"] = [{"name": n, "space": h.space, "model": h.model, "classes": h.classes} for n, h in srv.heads.items()]
    o = srv.options
    out["limits"] = {"max_upload_bytes": o.max_upload_bytes, "max_k": o.max_k, "max_queries": o.max_queries}
    out["backbones"] = [{"backbone": m.backbone.name, "device": str(m.embedder.device), "images": m.batcher.items,
                         "batches": m.batcher.batches} for m in srv.loaded_models()]
    out["events"] = list(srv.events)[-10:]
    return out


@router.get("/rows/{row}", summary="One row's path, label and split")
def row_info(row: int, request: Request) -> dict[str, Any]:
    st, _ = served(request).snapshot()
    check_row(st, row)
    rows = np.array([row], np.int64)
    return {"row": row, **{c: str(st.image_column(c, rows)[0]) for c in ("path", "label", "split")}}


@router.get("/rows/{row}/image", summary="One row's image file, as stored")
def row_file(row: int, request: Request) -> FileResponse:
    img = row_image(served(request).snapshot()[0], row)
    return FileResponse(img.file, media_type=img.media_type)


@router.get("/rows/{row}/thumbnail", summary="One row's image as a JPEG thumbnail")
def row_thumbnail(row: int, request: Request, size: int = Query(256, ge=16, le=1024)) -> Response:
    img = row_image(served(request).snapshot()[0], row)
    return Response(thumbnails.get(img, size), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=3600"})
