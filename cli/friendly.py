"""The CLI's error policy (one ``Error: ...`` line for a user's mistake, a traceback for a bug), its
JSON output (``emit_json``) and size options (``size_option``), used by the command modules, and the
slow helpers of ``main``'s commands, imported only when used.

Crash safety: writes nothing.
"""
from __future__ import annotations

import errno
import functools
import json
from typing import Any, Callable

import click

from embedstore.errors import EmbedstoreError


# OSErrors that are about a path the user named (whatever their message), and errnos that are about
# this machine rather than the code (disk full, read-only, no permission): shown as one line too.
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def user_error(e: BaseException) -> bool:
    """True for an error the user can fix: an :class:`EmbedstoreError` (the library's own, each
    naming the file or value and the fix), or an OSError about a path (a missing file, a folder where
    a file was expected, no permission, or any OSError that names its file) or about the machine
    (disk full, read-only). Anything else is a bug and keeps its traceback."""
    if isinstance(e, EmbedstoreError):
        return True
    return isinstance(e, PATH_ERRORS) or (isinstance(e, OSError) and (
        e.filename is not None or e.errno in ENVIRONMENT_ERRNOS))


def size_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """Click callback: a size such as ``8G`` or ``20M`` (``--memory``, ``--max-upload``) as bytes."""
    from embedstore.utils import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def workers_option(ctx: click.Context, param: click.Parameter, value: str | int | None) -> int | None:
    """Click callback: ``--workers auto`` (None: the library sizes them) or a count of processes, 0 or more."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        n = int(str(value))
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"{value!r} is neither auto nor a count of processes (0 or more)")
    return n


def emit_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON (what every ``--json`` option prints); non-JSON values as text."""
    click.echo(json.dumps(obj, indent=2, default=str))


def friendly(fn: Callable) -> Callable:
    """Show a user's mistake (see :func:`user_error`) as one line ``Error: ...`` and exit status 1;
    let every other exception through, so a bug shows its traceback instead of hiding behind a line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (EmbedstoreError, OSError) as e:
            if not user_error(e):
                raise
            raise click.ClickException(str(e)) from e

    return wrapper


def check_backbones(rows: list[dict[str, Any]]) -> None:
    """``embedstore backbones --check``: load each installed backbone, compare with the table.

    Adds ``check`` to each row: ``ok``, ``not installed``, or what differs / why it failed.
    """
    from embedstore.backbones import load_backbone

    for r in rows:
        if not r["offline"]:
            r["check"] = "not installed"
            continue
        try:
            bb = load_backbone(r["name"])
        except EmbedstoreError as e:
            r["check"] = f"failed: {e}"
            continue
        side = int(bb.data_config["input_size"][-1])
        diffs = [f"{k} {got} (listed {r[key]})" for k, key, got in (("dim", "dim", bb.dim), ("input", "input_size", side))
                 if got != r[key]]
        r["check"] = "ok" if not diffs else "differs: " + ", ".join(diffs)
