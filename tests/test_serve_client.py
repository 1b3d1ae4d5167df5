"""``embedstore serve`` as a real process on loopback: ``embedstore.Client`` and ``embedstore search
--server`` give what a local search gives, the client loads neither torch nor faiss, bad input
leaves it serving, and a SIGKILL loses nothing (the server never writes the store)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

import embedstore
from embedstore.serve.client import Client, ServerError
from embedstore_cli.main import main


def start_server(store: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """``embedstore serve STORE --port 0 --json``: the process and its URL, once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "embedstore_cli.main", "serve", str(store), "--port", "0",
                             "--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"the server did not start: {proc.stderr.read()}")
    url = json.loads(line)["url"]
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            Client(url, timeout=2).info()
            return proc, url
        except ServerError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not answer within 60 s")


@pytest.fixture
def server(tiny_store: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    proc, url = start_server(tiny_store)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def rows_of(result: dict[str, Any]) -> list[list[int]]:
    return [[h["row"] for h in hits] for hits in result["results"]]


def test_client_answers_as_a_local_search(server: tuple[subprocess.Popen, str], tiny_store: Path,
                                          collection: Path) -> None:
    _, url = server
    images = sorted(collection.rglob("*.png"))[:2]
    with Client(url) as c:
        for query in ({"rows": [1, 2]}, {"paths": ["val/red_disc/red_disc_001.png"]}, {"images": images},
                      {"images": [collection / "val"]}):
            got = c.search(**query, k=5, where={"split": "train"}, exclude_self=True)
            local = embedstore.search.search(tiny_store, **query, k=5, where={"split": "train"}, exclude_self=True)
            assert rows_of(got) == rows_of(local), query
            assert [q["query"] for q in got["queries"]] == [q["query"] for q in local["queries"]]
        with pytest.raises(ServerError, match="404.*row 4242"):
            c.search(rows=[4242])
        assert c.thumbnail(0)[:2] == b"\xff\xd8"  # a JPEG


def test_cli_search_server_prints_the_local_json(server: tuple[subprocess.Popen, str], tiny_store: Path) -> None:
    _, url = server
    runner = CliRunner()
    served = runner.invoke(main, ["search", "--server", url, "--row", "4", "-k", "3", "--json"])
    local = runner.invoke(main, ["search", str(tiny_store), "--row", "4", "-k", "3", "--json"])
    assert served.exit_code == 0 and local.exit_code == 0, served.output + local.output
    a, b = json.loads(served.stdout), json.loads(local.stdout)
    assert a["results"] == b["results"] and a["queries"] == b["queries"] and a["space"] == b["space"]
    wrong = runner.invoke(main, ["search", "other.h5", "--server", url, "--row", "4"])
    assert wrong.exit_code != 0 and "serves" in wrong.output


def test_the_client_side_imports_neither_torch_nor_faiss(server: tuple[subprocess.Popen, str],
                                                         collection: Path) -> None:
    _, url = server
    image = sorted(collection.rglob("*.png"))[0]
    code = (f"import sys, embedstore\nc = embedstore.Client({url!r})\n"
            f"r = c.search(images=[{str(image)!r}], k=2)\nassert r['results'][0], r\n"
            "from embedstore_cli.main import main\n"
            f"try:\n    main(['search', '--server', {url!r}, '--row', '0', '--where', 'label=red_disc'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'faiss', 'timm', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bad_requests_leave_the_server_serving_and_sigkill_loses_nothing(tiny_store: Path, collection: Path) -> None:
    before = hashlib.sha256(tiny_store.read_bytes()).hexdigest()
    proc, url = start_server(tiny_store, "--max-upload", "64K")
    try:
        import httpx

        with httpx.Client(base_url=url, timeout=30) as h:
            bad = [h.post("/api/search/image", files={"file": ("x.png", b"\x89PNG\r\n\x1a\n" + os.urandom(500))}),
                   h.post("/api/search/image", files={"file": ("big.jpg", os.urandom(200_000))}),
                   h.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}),
                   h.post("/api/search", json={"rows": [0], "k": -1}),
                   h.get("/api/rows/-5/image")]
            assert [r.status_code for r in bad] == [422, 413, 422, 422, 404]
            assert all(r.json()["detail"] for r in bad)
            assert h.post("/api/search", json={"rows": [0], "k": 2}).status_code == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert hashlib.sha256(tiny_store.read_bytes()).hexdigest() == before
    assert embedstore.search.search(tiny_store, rows=[0], k=2)["results"][0][0]["row"] == 0


def test_the_listening_socket_gets_tcp_nodelay_on_accepted_connections() -> None:
    """Without it, every response on a kept-alive connection waited for the client's delayed ACK."""
    import asyncio
    import socket

    from embedstore_cli.serve_commands import listen

    async def check() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=listen("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(check()) == 1


def test_cli_folder_queries_through_a_server_print_and_write_nothing_here(server: tuple[subprocess.Popen, str],
                                                                         collection: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = server
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = CliRunner().invoke(main, ["search", "--server", url, str(collection / "val" / "red_disc"), "-k", "2"])
    assert out.exit_code == 0, out.output
    assert out.stdout.count("query ") == 6 and "rank" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no served.search/ in the current directory
