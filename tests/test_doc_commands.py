"""Every `embedstore ...` command the README, docs/ and the CLI's own help show is one the CLI
accepts (options exist, take the values shown, arguments fit). Notebooks: tests/test_notebooks.py."""
from __future__ import annotations

from pathlib import Path

import click
import pytest

from support.cli_lines import code_cell_commands, markdown_commands, problems, segments

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_checker_refuses_what_the_cli_refuses() -> None:
    """The line notebook 01 used to show, and other mistakes click would stop at."""
    text = ("```bash\nembedstore index photos.h5 && embedstore search photos.h5 --image query.jpg\n"
            "embedstore index photos.h5 --target-recall 2  # out of range\nembedstore info a.h5 b.h5\n"
            "embedstore index\n```\nInline: `embedstore classify s.h5 --protocol loo`, and prose `embedstore embed`.")
    found = problems(markdown_commands(text))
    assert len(found) == 5, found
    for needle in ("--image", "--target-recall", "extra argument", "missing argument STORE", "--protocol"):
        assert any(needle in line for line in found), (needle, found)
    cell = '!embedstore search s.h5 --image q.jpg\nimport subprocess\nsubprocess.run(["embedstore", "info", "--bad"])'
    assert len(problems(code_cell_commands(cell))) == 2
    assert not problems(markdown_commands("```bash\nembedstore info photos.h5 [--failures] [--json]  # x\n```"))
    assert segments("$ embedstore finetune ... --json") == []  # an elided command is not checked


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_documented_commands_exist_in_the_cli(path: Path) -> None:
    commands = markdown_commands(path.read_text())
    assert commands, f"{path.name} shows no embedstore command: is the extraction broken?"
    bad = problems(commands)
    assert not bad, f"{path.name}: commands the CLI refuses:\n" + "\n".join(bad)


def test_help_text_examples_exist_in_the_cli() -> None:
    from embedstore_cli.main import main

    ctx = click.Context(main, info_name="embedstore")
    commands = [main, *(main.get_command(ctx, name) for name in main.list_commands(ctx))]
    lines = [line for c in commands for line in f"{c.help or ''}\n{c.epilog or ''}".splitlines()]
    found = [(argv, False) for line in lines for argv in segments(line)]  # prose around them: options only
    assert found
    assert not problems(found), "\n".join(problems(found))
