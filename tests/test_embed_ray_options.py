"""embed_ray refuses options it does not know before Ray is started or any worker created."""
from __future__ import annotations

from pathlib import Path

import pytest

from embedstore.errors import EmbedOptionError


def test_unknown_option_is_refused_before_ray_starts(collection: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from embedstore.pipeline import embed_ray

    assert not ray.is_initialized()
    try:
        with pytest.raises(EmbedOptionError, match=r"unknown options \['bogus'\]: it takes batch_size"):
            embed_ray(collection, tmp_path / "s.h5", bogus=1)
        assert not ray.is_initialized()
        assert not (tmp_path / "s.h5").exists()
    finally:
        if ray.is_initialized():
            ray.shutdown()
