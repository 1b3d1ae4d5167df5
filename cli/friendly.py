"""The command modules' error decorator (kept apart from ``main`` so they import without a cycle), and
the slow helpers of ``main``'s commands, imported only when used."""
from __future__ import annotations

import functools
from typing import Any, Callable


def friendly(fn: Callable) -> Callable:
    """Apply ``embedstore_cli.main.friendly_errors`` to ``fn``, looked up at call time."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from embedstore_cli.main import friendly_errors

        return friendly_errors(fn)(*args, **kwargs)

    return wrapper


def check_backbones(rows: list[dict[str, Any]]) -> None:
    """``embedstore backbones --check``: load each installed backbone, compare with the table.

    Adds ``check`` to each row: ``ok``, ``not installed``, or what differs / why it failed.
    """
    from embedstore.backbones import load_backbone
    from embedstore.errors import EmbedstoreError

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
