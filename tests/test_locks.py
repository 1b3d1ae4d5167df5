"""Writer locks (store and index): a live holder refuses the next writer; a SIGKILLed one never blocks it."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedstore.errors import StoreError, StoreLockedError
from embedstore.store.locks import try_lock
from embedstore.store import StoreWriter, lock_path

HOLD = textwrap.dedent("""
    import sys, time
    from embedstore.store.locks import try_lock
    held = try_lock(sys.argv[1])
    assert not isinstance(held, str), held
    print("locked", flush=True)
    time.sleep(600)
""")


def _holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_store_lock_of_a_sigkilled_writer_does_not_block(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    proc = _holder(lock_path(store))
    try:
        with pytest.raises(StoreLockedError, match=rf"being written by pid {proc.pid}"):
            StoreWriter(store).acquire()
    finally:
        _kill(proc)
    assert lock_path(store).exists()  # the killed writer's lock file is still there ...
    with StoreWriter(store):  # ... and does not block the next writer
        with pytest.raises(StoreLockedError, match="being written by pid"):
            StoreWriter(store).acquire()  # which in turn holds the lock
    with StoreWriter(store):
        pass


def test_index_build_lock_of_a_sigkilled_builder_does_not_block(tiny_store: Path) -> None:
    import embedstore
    from embedstore.index import build_index, index_files

    files = index_files(tiny_store, embedstore.open_store(tiny_store).space().name)
    proc = _holder(files.lock)
    try:
        with pytest.raises(StoreError, match=rf"being built by pid {proc.pid}"):
            build_index(tiny_store)
    finally:
        _kill(proc)
    assert build_index(tiny_store)["rows"] > 0


def test_no_fcntl_left_in_the_package() -> None:
    pkg = Path(__file__).resolve().parents[1] / "embedstore"
    users = [p.name for p in pkg.glob("*.py") if "import fcntl" in p.read_text()]
    assert users == []


def test_try_lock_names_the_holder_and_release_is_idempotent(tmp_path: Path) -> None:
    first = try_lock(tmp_path / "x.lock")
    assert not isinstance(first, str)
    assert try_lock(tmp_path / "x.lock").startswith("pid ")
    first.release()
    first.release()
    again = try_lock(tmp_path / "x.lock")
    assert not isinstance(again, str)
    again.release()
