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


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level names imported unconditionally at module level, every top-level name imported anywhere)."""
    import ast

    tree = ast.parse(path.read_text())

    def names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name.split(".")[0] for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            return {node.module.split(".")[0]}
        return set()

    everywhere = {n for node in ast.walk(tree) for n in names(node)}
    module_level = {n for node in tree.body for n in names(node)}  # not inside try/if/def: always imported
    return module_level, everywhere


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """A fresh `pip install -e .` must bring what `import embedstore...` needs (psutil was once missing)."""
    import sys
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    req = lambda spec: _canon(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])  # noqa: E731
    core = {req(d) for d in project["dependencies"]}
    extras = {req(d) for deps in project["optional-dependencies"].values() for d in deps}
    dists = packages_distributions()
    ours = {"embedstore", "embedstore_cli", "cli", "__future__"}
    missing = []
    for path in sorted((ROOT / "embedstore").rglob("*.py")) + sorted((ROOT / "cli").glob("*.py")):
        module_level, everywhere = _imports(path)
        for name in sorted(everywhere - ours - set(sys.stdlib_module_names)):
            owners = {_canon(d) for d in dists.get(name, [])}
            if not owners:  # not installed here: only an optional, guarded import may be absent
                assert name not in module_level, f"{path.relative_to(ROOT)} imports {name}, which is not installed"
                continue
            allowed = core if name in module_level else core | extras
            if not owners & allowed:
                missing.append(f"{path.relative_to(ROOT)}: {name} (distribution {sorted(owners)})")
    assert missing == [], "imports not declared in pyproject.toml: " + "; ".join(missing)
