"""finetune resume: a damaged checkpoint (state.json, weights, optimiser state) is one clear error
naming the file and the fix (--restart), never a traceback; --restart then trains again."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import click
from click.testing import CliRunner

import embedstore
from embedstore.finetuning import finetune
from embedstore_cli.finetune_commands import register

FAST = dict(precision="fp32", workers=0, progress=False)
SETTINGS = dict(out_space="r", unfreeze=1, epochs=2, lr=3e-3, batch_size=8)
ARGS = ["--out-space", "r", "--unfreeze", "1", "--epochs", "2", "--lr", "0.003", "--batch-size", "8",
        "--precision", "fp32", "--workers", "0", "--quiet"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _state_edit(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    def damage(folder: Path) -> Path:
        path = folder / "state.json"
        state = json.loads(path.read_text())
        path.write_text(json.dumps(edit(state)))
        return path
    return damage


def _file_named(key: str, how: Callable[[Path], None]) -> Callable[[Path], Path]:
    def damage(folder: Path) -> Path:
        path = folder / json.loads((folder / "state.json").read_text())[key]
        how(path)
        return path
    return damage


DAMAGES: dict[str, Callable[[Path], Path]] = {
    "state.json truncated": lambda f: (_truncate(f / "state.json"), f / "state.json")[1],
    "state.json not text": lambda f: (f.joinpath("state.json").write_bytes(b"\xff\xfe\x00garbage"), f / "state.json")[1],
    "state.json empty": lambda f: (f.joinpath("state.json").write_text(""), f / "state.json")[1],
    "state.json a list": _state_edit(lambda s: [s]),
    "state.json missing keys": _state_edit(lambda s: {k: v for k, v in s.items() if k not in ("weights", "best")}),
    "state.json wrong types": _state_edit(lambda s: s | {"epoch": "one", "history": {}}),
    "state.json names a file outside": _state_edit(lambda s: s | {"weights": "../../elsewhere.safetensors"}),
    "weights missing": _file_named("weights", Path.unlink),
    "weights truncated": _file_named("weights", _truncate),
    "optimizer missing": _file_named("optimizer", Path.unlink),
    "optimizer truncated": _file_named("optimizer", _truncate),
    # with no checksum to compare (an older checkpoint), the damaged file itself is refused on loading
    "weights truncated, no checksum": lambda f: (_state_edit(lambda s: s | {"weights_sha256": ""})(f),
                                                 _file_named("weights", _truncate)(f))[1],
    "optimizer truncated, no checksum": lambda f: (_state_edit(lambda s: s | {"optimizer_sha256": None})(f),
                                                   _file_named("optimizer", _truncate)(f))[1],
}


def test_a_damaged_checkpoint_is_one_clear_error_and_restart_recovers(tmp_path: Path, tiny_store: Path):
    part = finetune(tiny_store, stop_after=1, **SETTINGS, **FAST)
    assert not part["finished"] and part["epochs_run"] == 1
    folder = Path(part["checkpoint_dir"])
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)
    group = click.Group()
    register(group)
    runner = CliRunner()
    for name, damage in DAMAGES.items():
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        path = damage(folder)
        res = runner.invoke(group, ["finetune", str(tiny_store), *ARGS])
        out = res.output
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (name, out, res.exception)
        assert "Traceback" not in out and len(out.splitlines()) == 1 and out.startswith("Error: "), (name, out)
        shown = path if name != "state.json names a file outside" else folder / "state.json"
        assert str(shown) in out and "--restart" in out, (name, out)
    # the error's advice works: --restart trains from the start over the damaged checkpoint
    res = runner.invoke(group, ["finetune", str(tiny_store), *ARGS, "--restart", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["finished"] and summary["resumed_from_epoch"] is None and summary["epochs_run"] == 2
    assert "r" in embedstore.open_store(tiny_store).spaces
