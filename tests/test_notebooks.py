"""The notebooks run top to bottom on the built-in example, so they never rot.

Fast: every `embedstore ...` command a notebook shows (Markdown shell blocks, inline code, shell
escapes) parses with the real CLI. Slow (``-m slow``): each notebook is executed with nbclient
in a fresh kernel, in a temporary folder (they write their work folders relative to the working
directory). A cell that raises, including the
notebooks' own sanity ``assert``s, fails the test. The executed notebooks, outputs included,
are kept in the ``artifacts`` folder (tests/conftest.py).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from support.cli_lines import code_cell_commands, markdown_commands, problems

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_quickstart", "02_compare_backbones_and_heads", "03_finetune", "04_curation"}


def code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_the_notebooks_are_there() -> None:
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_the_public_api_only(path: Path) -> None:
    for source in code_cells(path):
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("embedstore"):
                names = [node.module, *(a.name for a in node.names)]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "embedstore":
                names = [node.attr]
            private = [n for n in names for part in n.split(".") if part.startswith("_")]
            assert not private, f"{path.name} uses private names {private}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_commands_exist_in_the_cli(path: Path) -> None:
    """A shell line in a notebook is not executed by the notebook test; parse it with the CLI."""
    commands = []
    for cell in nbformat.read(path, as_version=4).cells:
        commands += markdown_commands(cell.source) if cell.cell_type == "markdown" else code_cell_commands(cell.source)
    assert not problems(commands), f"{path.name}: commands the CLI refuses:\n" + "\n".join(problems(commands))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, tmp_path: Path, artifacts: Path) -> None:
    book = nbformat.read(path, as_version=4)
    env = {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(book, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert all(c.execution_count for c in book.cells if c.cell_type == "code" and c.source.strip())
    written = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert ".h5" in written and ".png" in written  # the notebook really embedded images into a store
    nbformat.write(book, artifacts / path.name)
