"""``embedstore serve``: a long-running search server (JSON API + web page) over one store, a thin
layer over :mod:`embedstore.serve`. Add it to a group with ``register(group)``."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path

import click

from embedstore_cli.friendly import friendly, size_option


def _heads(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Path]:
    """``--head NAME=DIR`` (or ``--head DIR``: named after the folder) as {name: folder}."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value).name, value
        if not name or not folder:
            raise click.BadParameter(f"{value!r}: give NAME=DIR or DIR (a folder saved by classify --save-head)")
        if name in out:
            raise click.BadParameter(f"two heads are named {name!r}: name them with NAME=DIR")
        out[name] = Path(folder)
    return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one) for uvicorn to serve on.

    Made with IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets that say they
    are TCP; without it every response on a kept-alive connection waited ~40 ms (Nagle against
    the client's delayed ACK: 47 ms per request instead of 5 ms, measured with httpx and curl)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@click.command("serve")
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: a free one, printed at start).")
@click.option("--token", envvar="EMBEDSTORE_TOKEN", show_envvar=True,
              help="Secret every API request must carry (Authorization: Bearer TOKEN, or ?token=TOKEN; "
                   "open the page as /?token=TOKEN).")
@click.option("--head", "heads", multiple=True, callback=_heads, metavar="NAME=DIR",
              help="A saved head (classify --save-head DIR) to answer /api/predict with (repeatable).")
@click.option("--device", default="auto", show_default=True, help="Where query images and texts are embedded.")
@click.option("--max-upload", default="20M", show_default=True, callback=size_option,
              help="Largest image upload (and request body) accepted; bigger ones get 413.")
@click.option("--max-k", default=1000, show_default=True, type=click.IntRange(1),
              help="Most hits one query may ask for (k + offset).")
@click.option("--refresh", default=2.0, show_default=True, type=click.FloatRange(0),
              help="Seconds between checks for rows an embed run added (0: serve the store as opened).")
@click.option("--no-reindex", is_flag=True,
              help="Never update a stale index in the background (rows it lacks are still searched exactly).")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.option("--json", "as_json", is_flag=True, help='Print {"url", "store", "pid"} as one JSON line once listening.')
@friendly
def serve_command(store: str, host: str, port: int, token: str | None, heads: dict[str, Path], device: str,
                  max_upload: int, max_k: int, refresh: float, no_reindex: bool, access_log: bool,
                  as_json: bool) -> None:
    """Serve similarity search over STORE: a web page and a JSON API.

    \b
    The backbone and each space's index are loaded once; vectors are read on
    demand. Open the printed address in a browser: drop an image (or type text,
    for open_clip spaces) and browse its neighbours. Scripts use the same API:
      embedstore search --server http://127.0.0.1:8000 --row 42 --json
      python -c "import embedstore; print(embedstore.Client('http://127.0.0.1:8000').search(rows=[42]))"
    The API is described at /docs (OpenAPI: /openapi.json). Rows an `embedstore
    embed` run adds are picked up while serving; a stale index is brought up to
    date in the background (the only files the server writes). Ctrl-C stops it.
    """
    import uvicorn

    from embedstore.serve.app import create_app
    from embedstore.serve.state import ServedStore, ServeOptions

    if not _loopback(host) and not token:
        raise click.UsageError(f"--host {host} is reachable from other machines: pass --token SECRET "
                               "(or set EMBEDSTORE_TOKEN), or keep the default --host 127.0.0.1")
    options = ServeOptions(device=device, max_upload_bytes=max_upload, max_k=max_k, refresh_seconds=refresh,
                           reindex=not no_reindex, heads=heads)
    served = ServedStore(store, options)  # a bad store or head fails here, before a port is bound
    try:
        sock = listen(host, port)
    except OSError as e:
        served.close()
        raise click.ClickException(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port "
                                   "(0 picks a free one)") from None
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    st = served.store
    if as_json:
        click.echo(json.dumps({"url": url, "store": str(Path(store).resolve()), "pid": os.getpid()}), nl=True)
    else:
        spaces = ", ".join(f"{n} ({len(s)} x {s.dim}, {'index' if served.indexes.get(n) else 'exact'})"
                           for n, s in st.spaces.items())
        click.echo(f"serving {store}: {st.n_images} images; spaces: {spaces or 'none'}")
        click.echo(f"  page: {url}/{'?token=...' if token else ''}   API: {url}/docs   (Ctrl-C stops)")
    config = uvicorn.Config(create_app(served, token=token), log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def register(group: click.Group) -> None:
    """Add ``serve`` to a click group (the ``embedstore`` command)."""
    group.add_command(serve_command, "serve")
