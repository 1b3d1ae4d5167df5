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
print(json.dumps({{"exit": code, "loaded": sorted(m for m in {watch!r} if m in sys.modules)}}))
"""


def probe(args: list[str], watch: tuple[str, ...]) -> dict:
    """Run the CLI with ``args`` in a fresh interpreter: its exit code and which of ``watch`` it imported."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=args, watch=watch)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def registered_commands() -> list[str]:
    from embedstore_cli.main import main

    return sorted(main.commands)


@pytest.mark.parametrize("command", ["", *registered_commands()])
def test_help_imports_no_heavy_library(command: str) -> None:
    args = [command, "--help"] if command else ["--help"]
    assert probe(args, HEAVY) == {"exit": 0, "loaded": []}


def test_choices_match_the_implementations() -> None:
    from embedstore.heads import DEFAULT_MODELS, MODELS
    from embedstore.index import KINDS

    assert tuple(MODELS) == DEFAULT_MODELS == choices.HEADS
    assert KINDS == choices.INDEX_KINDS


def test_embed_choices_come_from_one_place() -> None:
    """``embed``'s --precision, --runtime, --dtype, --engine and --shards offer exactly what the library accepts:
    the library modules and the CLI read the same tuples from :mod:`embedstore.choices`."""
    import click

    from embedstore.embedding import embedder, runtimes
    from embedstore.pipeline import ray_runner, run, shards
    from embedstore_cli.main import embed

    assert embedder.PRECISIONS is choices.PRECISIONS and runtimes.RUNTIMES is choices.RUNTIMES is run.RUNTIMES
    assert run.STORE_DTYPES is choices.STORE_DTYPES and run.ENGINES is choices.ENGINES
    assert shards.MAX_SHARDS is choices.MAX_SHARDS is ray_runner.MAX_SHARDS
    opts = {o.name: o.type for o in embed.params}
    assert tuple(opts["precision"].choices) == choices.PRECISIONS
    assert tuple(opts["runtime"].choices) == choices.RUNTIMES == ("auto", "torch", "onnxruntime", "openvino")
    assert tuple(opts["dtype"].choices) == choices.STORE_DTYPES
    assert tuple(opts["engine"].choices) == choices.ENGINES
    assert isinstance(opts["shards"], click.IntRange) and (opts["shards"].min, opts["shards"].max) == (1, choices.MAX_SHARDS)
    # N is written in five digits: the largest N still makes a shard file name that is found again
    top = choices.MAX_SHARDS
    assert shards._SHARD_RE.match(shards.shard_file("s.h5", top - 1, top).name)
    assert not shards._SHARD_RE.match(shards.shard_file("s.h5", top, top + 1).name)


# --------------------------------------------------------------------------- cold commands that read vectors

TORCH_SIDE = ("torch", "timm", "torchvision", "PIL", "embedstore.backbones.load", "embedstore.embedding")


def run_cold(args: list[str]) -> dict:
    return probe(args, TORCH_SIDE)


@pytest.fixture(scope="module")
def vector_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(store, query.npy): 300 synthetic vectors written with commit_arrays, with a flat index."""
    import numpy as np

    from embedstore.index import build_index
    from embedstore.store import StoreWriter

    folder = tmp_path_factory.mktemp("cold")
    store = folder / "cold.h5"
    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float16)
    with StoreWriter(store, root=str(folder)) as w:
        w.commit_arrays("syn", {"dim": 16, "dtype": "float16", "backbone": "synthetic", "weights_sha256": None},
                        vectors, [f"img/{i}.png" for i in range(300)], labels=[f"c{i % 2}" for i in range(300)])
    build_index(store, kind="flat")
    np.save(folder / "query.npy", vectors[7].astype(np.float32))
    return str(store), str(folder / "query.npy")


@pytest.mark.parametrize("how", ["info", "row", "path", "vector", "row-where", "duplicates"])
def test_commands_over_stored_vectors_never_import_torch(vector_store: tuple[str, str], how: str) -> None:
    store, query = vector_store
    args = {"info": ["info", store, "--json"],
            "row": ["search", store, "--row", "42", "--json"],
            "path": ["search", store, "--path", "img/5.png", "--exact"],
            "vector": ["search", store, "--vector", query, "-k", "3", "--json"],
            "row-where": ["search", store, "--row", "42", "--where", "label=c1", "--exclude-self"],
            "duplicates": ["duplicates", store, "--json"]}[how]
    assert run_cold(args) == {"exit": 0, "loaded": []}


def test_image_queries_do_import_the_backbone(session_tiny_store: tuple) -> None:
    images, store = session_tiny_store
    query = str(next(iter(sorted(images.rglob("*.png")))))
    got = run_cold(["search", str(store), "--query", query, "-k", "2", "--json"])
    assert got["exit"] == 0 and {"torch", "timm", "embedstore.backbones.load"} <= set(got["loaded"])
