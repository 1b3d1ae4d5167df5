"""``Client``: the queries of :func:`embedstore.search.search` sent to a running ``embedstore
serve``, with the same arguments and the same result dict, at the served speed.

The client imports neither torch nor faiss (httpx and the standard library only; image files
are uploaded as they are, the server embeds them). Errors the server answers with (4xx and its
message) raise :class:`ServerError`; a query image the server cannot decode gets an empty hit
list and an ``error`` in ``queries``, as a local search gives it.

Crash safety: nothing here writes a file.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from ..errors import ServerError

__all__ = ["Client", "ServerError"]


class Client:
    """A search server at ``url`` (``http://127.0.0.1:8000``); ``token`` if it was started with one.

    >>> c = Client("http://127.0.0.1:8000")                       # doctest: +SKIP
    >>> c.search(rows=[42], k=5, where={"label": "cat"})          # doctest: +SKIP
    """

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 120.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------------- transport

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ServerError(f"cannot reach {self.url} ({e}): is `embedstore serve STORE` running there?") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # FastAPI's validation errors: where and what
                detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail)
            raise ServerError(f"{self.url}{path}: {r.status_code}: {detail}", r.status_code)
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.content

    # ----------------------------------------------------------------------- queries

    def info(self) -> dict[str, Any]:
        """The served store: its summary, spaces (index, image/text queries), heads and limits."""
        return self._request("GET", "/api/info")

    def search(self, *, images: Sequence[str | os.PathLike] | None = None, rows: Sequence[int] | None = None,
               paths: Sequence[str] | None = None, vectors: Any = None, texts: Sequence[str] | None = None,
               k: int = 10, space: str | None = None, where: dict[str, str] | None = None, exact: bool = False,
               exclude_self: bool = False, offset: int = 0) -> dict[str, Any]:
        """Nearest neighbours, as :func:`embedstore.search.search` (``texts`` for spaces with a text
        tower; ``offset`` skips that many hits, for pages). Image files and folders are uploaded one
        image per request; their results are gathered in order into one result dict."""
        given = [x is not None for x in (images, rows, paths, vectors, texts)]
        if sum(given) != 1:
            raise ServerError("give exactly one kind of query: images, rows, paths, vectors or texts")
        if images is None:
            body: dict[str, Any] = {"k": k, "space": space, "where": where or None, "exact": exact,
                                    "exclude_self": exclude_self, "offset": offset}
            if vectors is not None:
                body["vectors"] = [[float(x) for x in v] for v in _rows_of(vectors)]
            else:
                body.update(rows=list(map(int, rows)) if rows is not None else None,
                            paths=list(map(str, paths)) if paths is not None else None,
                            texts=list(texts) if texts is not None else None)
            return self._request("POST", "/api/search", json={k_: v for k_, v in body.items() if v is not None})
        return self._search_images(images, k=k, space=space, where=where or {}, exact=exact,
                                   exclude_self=exclude_self, offset=offset)

    def _search_images(self, images: Sequence[str | os.PathLike], **opts: Any) -> dict[str, Any]:
        from ..data.collection import expand_images

        params = {key: v for key, v in {**opts.pop("where"), **opts}.items() if v is not None}
        merged: dict[str, Any] = {}
        results, queries = [], []
        for item in expand_images(images, what="query image"):
            try:
                with open(item.path, "rb") as f:
                    out = self._request("POST", "/api/search/image", params=params,
                                        files={"file": (os.path.basename(item.path), f)})
            except ServerError as e:
                if e.status not in (413, 422):
                    raise
                results.append([])
                queries.append({"query": item.rel, "error": str(e).split(": ", 2)[-1]})
                continue
            merged = out
            results.extend(out["results"])
            queries.extend({**q, "query": item.rel} for q in out["queries"])
        return {**merged, "results": results, "queries": queries}

    def predict(self, head: str, *, images: Sequence[str | os.PathLike] | None = None,
                rows: Sequence[int] | None = None, paths: Sequence[str] | None = None, vectors: Any = None,
                top_k: int = 3) -> dict[str, Any]:
        """Labels by a head the server was started with (``--head NAME=DIR``)."""
        if images is None:
            body = {"head": head, "top_k": top_k, "rows": list(map(int, rows)) if rows is not None else None,
                    "paths": list(paths) if paths is not None else None,
                    "vectors": [[float(x) for x in v] for v in _rows_of(vectors)] if vectors is not None else None}
            return self._request("POST", "/api/predict", json={k: v for k, v in body.items() if v is not None})
        from ..data.collection import expand_images

        out: dict[str, Any] = {"head": head, "predictions": []}
        for item in expand_images(images, what="image"):
            with open(item.path, "rb") as f:
                got = self._request("POST", "/api/predict/image", params={"head": head, "top_k": top_k},
                                    files={"file": (os.path.basename(item.path), f)})
            out.update({k: v for k, v in got.items() if k != "predictions"})
            out["predictions"] += [{**p, "query": item.rel} for p in got["predictions"]]
        return out

    def thumbnail(self, row: int, size: int = 256) -> bytes:
        """A JPEG thumbnail of a row's image."""
        return self._request("GET", f"/api/rows/{int(row)}/thumbnail", params={"size": size})


def _rows_of(vectors: Any) -> list[Any]:
    """A vector or a 2-D array-like as a list of vectors (numpy not needed)."""
    rows = vectors.tolist() if hasattr(vectors, "tolist") else list(vectors)
    return [rows] if rows and not isinstance(rows[0], (list, tuple)) else rows
