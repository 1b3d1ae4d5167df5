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
