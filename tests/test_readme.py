"""The README's quick start is what CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    assert block, "README.md has no Quick start code block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_that_ci_runs():
    commands = quick_start_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci, f".ci/run does not run the README command: {command}"
    assert "torch==2.14.1" in commands[0] and "embedstore demo" in commands[0]


def test_ci_runs_the_slow_tier_that_the_readme_command_leaves_out():
    """`python -m pytest -q` is the fast tier (pyproject deselects @pytest.mark.slow); CI runs both."""
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m 'not slow'" in options["addopts"] and any(m.startswith("slow:") for m in options["markers"])
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "python -m pytest -q" in ci and "python -m pytest -q -m slow" in ci
    assert ci.index("python -m pytest -q") < ci.index("python -m pytest -q -m slow")
