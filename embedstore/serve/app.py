"""The search server's ASGI application: FastAPI routes (``api``), the web page (``static/``),
request limits, the optional token, and errors as 4xx responses with a message.

``create_app`` takes a :class:`ServedStore` already opened (so a bad store fails before a port
is bound) or a path; its lifespan starts the watcher that follows the store and stops it with
the server. Errors the library raises on purpose (``EmbedstoreError``) become ``{"detail":
message}`` with a 4xx status; a body over the upload limit is refused with 413 before it is read.

Crash safety: the application writes nothing (see ``state`` for the index it may bring up to date).
"""
from __future__ import annotations

import hmac
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline  # /docs with Swagger UI's files from the package, not a CDN
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..errors import BackboneError, EmbedstoreError, NotFoundError, ServeError, UploadTooLargeError
from .state import ServedStore, ServeOptions

STATIC = Path(__file__).parent / "static"
# the page and the API's description carry no data of the store: the page asks the API with the token
OPEN_PATHS = ("/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/favicon.ico")


def _status(e: EmbedstoreError) -> int:
    if isinstance(e, ServeError):
        return e.status  # 413 too large, 422 not an image, 403 outside the root, 404 no such row
    if isinstance(e, BackboneError):
        return 409  # the backbone here differs from the one that built the space
    if isinstance(e, NotFoundError):
        return 404
    return 400  # QueryError, HeadError, StoreError...: the request asks for something that cannot be done


class BodyLimit:
    """ASGI middleware refusing request bodies over ``limit`` bytes with 413, by Content-Length
    when given, else while the body streams in (the handler sees a disconnect)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _json(send, 413, f"the request body ({int(length)} bytes) is over this server's limit of "
                                          f"{self.limit} bytes (start it with a larger --max-upload)")
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # answered 413 by the app's error handler
                raise UploadTooLargeError(f"the request body is over this server's limit of {self.limit} bytes "
                                          "(start it with a larger --max-upload)")
            return message

        await self.app(scope, limited, send)


async def _json(send: Any, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(store: ServedStore | str | os.PathLike, options: ServeOptions | None = None,
               token: str | None = None) -> FastAPI:
    """The ASGI app serving ``store``; ``token``: every API request must carry it (header
    ``Authorization: Bearer TOKEN``, or ``?token=TOKEN`` for links such as thumbnails)."""
    from .api import router

    srv = store if isinstance(store, ServedStore) else ServedStore(store, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        srv.start()
        try:
            yield
        finally:
            srv.close()

    app = FastAPIOffline(title="embedstore search", lifespan=lifespan,
                  description=f"Similarity search over {srv.path}: by image, text, row, path or vector. "
                              "Scores are cosine similarities.")
    app.state.served = srv
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.exception_handler(EmbedstoreError)
    async def library_error(request: Request, e: EmbedstoreError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=_status(e))

    if token:
        @app.middleware("http")
        async def check_token(request: Request, call_next: Any) -> Any:
            path = request.url.path
            if path in OPEN_PATHS or path.startswith(("/static/", "/static-offline-docs/")):
                return await call_next(request)
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
                or request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "this server needs its token: send 'Authorization: Bearer TOKEN' "
                                               "or add ?token=TOKEN (the --token the server was started with)"},
                                    status_code=401)
            return await call_next(request)

    app.add_middleware(BodyLimit, limit=srv.options.max_upload_bytes + (64 << 10))  # multipart framing on top
    return app
