"""A device name torch cannot read is a user's mistake: one ``Error:`` line naming it, exit 1, no traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from embedstore.errors import EmbedOptionError
from embedstore_cli.main import main
from imagegen import TINY_BACKBONE


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_resolve_device_refuses_a_name_torch_cannot_read(device: str) -> None:
    from embedstore.embedding import resolve_device

    with pytest.raises(EmbedOptionError, match=f"cannot use device '{device}'.*use --device auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_resolve_device_still_reads_good_names() -> None:
    from embedstore.embedding import resolve_device

    assert str(resolve_device("cpu")) == "cpu" and str(resolve_device("cpu:0")) == "cpu:0"


def test_embed_with_an_unknown_device_is_one_error_line(collection: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    res = CliRunner().invoke(main, ["embed", str(collection), "--store", str(store), "--backbone", TINY_BACKBONE,
                                    "--weights", "random", "--workers", "0", "--device", "gpu", "--quiet"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: cannot use device 'gpu'") and res.output.count("\n") == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
