"""The command modules' error decorator, kept apart from ``main`` so they import without a cycle."""
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
