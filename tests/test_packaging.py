"""The distribution name is ours on PyPI (``embedstore`` there is another project); docs install that name."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = "tl-embedstore"
# `pip install embedstore`, `pip install "embedstore[ray]"`, `'embedstore[gpu]'`: all install the other project
WRONG = re.compile(r"""pip install\s+(?:-U\s+)?["']?embedstore(?![-\w])|["']embedstore\[""")


def test_distribution_name_is_not_the_taken_pypi_name() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DIST and project["name"] != "embedstore"
    assert "embedstore" in project["scripts"]  # the command keeps its name
    assert any(d.startswith("filelock") for d in project["dependencies"])
    assert {"ray", "gpu", "test"} <= set(project["optional-dependencies"])


def _wrong_lines(paths: list[Path]) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in paths
            for i, line in enumerate(p.read_text().splitlines(), 1) if WRONG.search(line)]


def test_docs_install_the_right_distribution() -> None:
    assert _wrong_lines([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]) == []


def test_messages_name_the_right_distribution() -> None:
    sources = sorted((ROOT / "embedstore").glob("*.py")) + sorted((ROOT / "cli").glob("*.py"))
    assert _wrong_lines(sources) == []
