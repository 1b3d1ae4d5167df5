"""The command line starts without importing torch, timm, faiss or scikit-learn; its choices agree
with the modules that implement them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from embedstore import choices

HEAVY = ("torch", "timm", "faiss", "sklearn", "h5py", "ray")
PROBE = """
import json, sys
from embedstore_cli.main import main
code = None
try:
    main({args!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"exit": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def registered_commands() -> list[str]:
    from embedstore_cli.main import main

    return sorted(main.commands)


@pytest.mark.parametrize("command", ["", *registered_commands()])
def test_help_imports_no_heavy_library(command: str) -> None:
    args = [command, "--help"] if command else ["--help"]
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"exit": 0, "heavy": []}


def test_choices_match_the_implementations() -> None:
    from embedstore.heads import DEFAULT_MODELS, MODELS
    from embedstore.index import KINDS

    assert tuple(MODELS) == DEFAULT_MODELS == choices.HEADS
    assert KINDS == choices.INDEX_KINDS


def test_embed_choices_come_from_one_place() -> None:
    """``embed``'s --precision, --dtype, --engine and --shards offer exactly what the library accepts:
    the library modules and the CLI read the same tuples from :mod:`embedstore.choices`."""
    import click

    from embedstore.embedding import embedder
    from embedstore.pipeline import ray_runner, run, shards
    from embedstore_cli.main import embed

    assert embedder.PRECISIONS is choices.PRECISIONS
    assert run.STORE_DTYPES is choices.STORE_DTYPES and run.ENGINES is choices.ENGINES
    assert shards.MAX_SHARDS is choices.MAX_SHARDS is ray_runner.MAX_SHARDS
    opts = {o.name: o.type for o in embed.params}
    assert tuple(opts["precision"].choices) == choices.PRECISIONS
    assert tuple(opts["dtype"].choices) == choices.STORE_DTYPES
    assert tuple(opts["engine"].choices) == choices.ENGINES
    assert isinstance(opts["shards"], click.IntRange) and (opts["shards"].min, opts["shards"].max) == (1, choices.MAX_SHARDS)
    # N is written in five digits: the largest N still makes a shard file name that is found again
    top = choices.MAX_SHARDS
    assert shards._SHARD_RE.match(shards.shard_file("s.h5", top - 1, top).name)
    assert not shards._SHARD_RE.match(shards.shard_file("s.h5", top, top + 1).name)
