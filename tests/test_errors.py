"""The error policy (issue 16.2): a user's mistake is one ``Error: ...`` line and exit status 1; a bug
keeps its traceback. The library raises only EmbedstoreError subclasses for user-facing problems, all
defined in embedstore/errors.py."""
from __future__ import annotations

import ast
import builtins
import errno
import inspect
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import embedstore
from embedstore import errors
from embedstore.errors import EmbedstoreError, ReportError, SizeError
from embedstore.utils import parse_size
from embedstore_cli.friendly import friendly
from embedstore_cli.main import main

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "embedstore"
BARE = {"ValueError", "RuntimeError", "TypeError"}


def _command(exc: BaseException) -> click.Command:
    """A click command whose body raises ``exc``, wrapped like every embedstore command."""

    @click.command()
    @friendly
    def boom() -> None:
        raise exc

    return boom


def _modules(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


# ------------------------------------------------------------------ (a) user errors: one line, exit 1


def test_an_embedstore_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["embed", str(tmp_path), "--max-file-size", "12X"])
    assert res.exit_code == 1, res.output
    assert res.output.splitlines() == ["Error: cannot read size '12X': use a number with an optional K/M/G/T suffix, "
                                       "e.g. '4G'"]
    assert isinstance(res.exception, SystemExit)


@pytest.mark.parametrize("exc", [
    EmbedstoreError("store x.h5 is damaged: rebuild it"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "missing.h5"),
    PermissionError(errno.EACCES, "Permission denied", "/root/out.html"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EIO, "Input/output error", "photos/a.jpg"),
    FileNotFoundError("no store at x.h5: create one with `embedstore embed FOLDER --store x.h5`"),
])
def test_user_errors_become_one_error_line(exc: BaseException) -> None:
    res = CliRunner().invoke(_command(exc), [])
    assert res.exit_code == 1 and res.output == f"Error: {exc}\n"


def test_library_errors_keep_their_python_bases() -> None:
    with pytest.raises(SizeError) as err:
        parse_size("four gigabytes")
    assert isinstance(err.value, ValueError) and isinstance(err.value, EmbedstoreError)
    assert "'four gigabytes'" in str(err.value) and "'4G'" in str(err.value)


def test_embedding_options_are_embedstore_errors(tmp_path: Path) -> None:
    import torch

    from embedstore.embedding import resolve_device, resolve_precision
    from embedstore.errors import EmbedOptionError

    with pytest.raises(EmbedOptionError, match="precision must be one of auto, fp32, bf16, fp16, not 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(EmbedOptionError, match="no CUDA GPU is visible: use --device cpu or auto"):
            resolve_device("cuda:0")


# ------------------------------------------------------------------ (b) bugs are not swallowed


@pytest.mark.parametrize("exc", [
    ZeroDivisionError("division by zero"),
    ValueError("a numpy shape mismatch"),
    KeyError("labels"),
    OSError("HDF5 internal error"),  # no filename, no errno: not about a path the user gave
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
])
def test_a_bug_propagates_with_its_traceback(exc: BaseException) -> None:
    def buggy() -> None:
        raise exc

    with pytest.raises(type(exc)) as caught:
        friendly(buggy)()
    assert caught.value is exc
    res = CliRunner().invoke(_command(exc), [])
    assert res.exception is exc and "Error:" not in res.output


def test_a_bug_in_a_real_command_shows_a_traceback(tmp_path: Path) -> None:
    """Run in a subprocess: what a user sees when the code, not the input, is at fault."""
    import subprocess
    import sys

    code = ("import click, sys\n"
            "from embedstore_cli.main import main, friendly\n"
            "@main.command('crash')\n@friendly\ndef crash():\n    1 / 0\n"
            "sys.argv = ['embedstore', 'crash']\nmain()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ZeroDivisionError: division by zero" in res.stderr
    assert not [line for line in res.stderr.splitlines() if line.startswith("Error:")]


# ------------------------------------------------------------------ (c) what the library raises


def test_every_error_class_is_an_embedstore_error() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 10
    assert [c.__name__ for c in classes if not issubclass(c, EmbedstoreError)] == []
    assert issubclass(ReportError, ValueError)


def _exception_names() -> set[str]:
    names = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    return names | {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)}


def test_no_module_outside_errors_defines_an_exception() -> None:
    known = _exception_names()
    found = []
    for path in _modules(PACKAGE, ROOT / "cli"):
        if path == PACKAGE / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
                if any(b in known or b.endswith(("Error", "Exception")) for b in bases):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} class {node.name}")
    assert found == [], "define exceptions in embedstore/errors.py: " + "; ".join(found)


def bare_raises(folder: Path = PACKAGE) -> list[str]:
    """``raise ValueError(...)`` / ``RuntimeError`` / ``TypeError`` statements (and bare names) under ``folder``."""
    found = []
    for path in _modules(folder):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name) and target.id in BARE:
                    found.append(f"{path.relative_to(folder.parent)}:{node.lineno} raise {target.id}")
    return found


def test_bare_raises_are_found(tmp_path: Path) -> None:
    """The scanner finds what it looks for (so the next test cannot pass by scanning nothing)."""
    (tmp_path / "m.py").write_text("def f():\n    raise ValueError('x')\n\ndef g():\n    raise TypeError\n\n"
                                   "def h():\n    raise KeyError('fine')\n")
    assert bare_raises(tmp_path) == [f"{tmp_path.name}/m.py:2 raise ValueError", f"{tmp_path.name}/m.py:5 raise TypeError"]


def test_no_bare_value_runtime_or_type_errors_in_the_library() -> None:
    found = bare_raises()
    assert found == [], (f"{len(found)} bare raise(s) left; raise an embedstore.errors class (with ValueError as a "
                         "second base where callers catch ValueError):\n" + "\n".join(found))


def test_top_level_errors_are_the_classes_of_errors_py() -> None:
    for name in ("EmbedstoreError", "StoreError", "BackboneError", "CollectionError", "HeadError"):
        assert getattr(embedstore, name) is getattr(errors, name)
