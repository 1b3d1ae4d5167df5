"""``--workers auto`` (issue 19): decode processes sized to the cores from the measured cost of each stage."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from imagegen import TINY_BACKBONE, make_collection
import embedstore.embedding.embedder as embedder_module
from embedstore.embedding.embedder import auto_workers, size_workers


def test_cores_are_shared_in_the_ratio_of_the_measured_costs():
    assert size_workers(16, 0.001, 0.015) == 1  # cheap decoding: the model keeps 15 cores
    assert size_workers(16, 0.010, 0.010) == 8  # equal costs: half and half
    assert size_workers(16, 0.030, 0.002) == 15  # huge photos: every core but the model's one
    assert size_workers(2, 0.030, 0.002) == 1 and size_workers(1, 0.01, 0.01) == 1


def test_auto_measures_both_stages_on_a_many_core_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from embedstore import load_backbone
    from embedstore.data import ImageReader, discover, draft_size
    from embedstore.embedding import Embedder

    _, items = discover(make_collection(tmp_path / "c", per_class=2, fmt="jpg"))
    emb = Embedder(load_backbone(TINY_BACKBONE, weights="random"), device="cpu", precision="fp32")
    reader = ImageReader(items, emb.backbone.eval_transform(), draft_size(emb.backbone.data_config))
    for cores, workers in ((1, 1), (2, 2)):  # 1-2 cores: one worker per core, the rule, no measurement
        monkeypatch.setattr(embedder_module, "cpu_cores", lambda: cores)
        assert auto_workers(items, emb, reader) == (workers, "")
    monkeypatch.setattr(embedder_module, "cpu_cores", lambda: 12)
    n, why = auto_workers(items, emb, reader)
    assert 1 <= n <= 11 and "for 12 cores" in why and "ms" in why, why


def test_cli_takes_auto_or_a_count(tmp_path: Path):
    from embedstore_cli.main import main

    coll = make_collection(tmp_path / "c", per_class=1, splits=())
    runner = CliRunner()
    bad = runner.invoke(main, ["embed", str(coll), "--workers", "-2", "--backbone", TINY_BACKBONE, "--weights", "random"])
    assert bad.exit_code == 2 and "neither auto nor a count" in bad.output
    ok = runner.invoke(main, ["embed", str(coll), "--workers", "auto", "--backbone", TINY_BACKBONE,
                              "--weights", "random", "--json", "--quiet", "--runtime", "torch"])
    assert ok.exit_code == 0, ok.output
    assert '"embedded": 3' in ok.output


def test_batches_embedded_before_a_failure_are_committed_and_not_redone(tmp_path: Path):
    """The commits run on a thread beside inference (issue 19): a run that fails still leaves every batch it
    had embedded in the journal, in order, and the next run embeds only the rest."""
    import embedstore
    from embedstore import load_backbone
    from embedstore.data import discover
    from embedstore.embedding import Embedder
    from embedstore.pipeline.worker import embed_batches
    from embedstore.store import StoreWriter

    root, items = discover(make_collection(tmp_path / "c", per_class=4, splits=()))  # 12 images
    emb = Embedder(load_backbone(TINY_BACKBONE, weights="random"), device="cpu", precision="fp32")
    calls = []

    class FailsOnThirdBatch:  # the real embedder, with a fault injected on its third call
        def __getattr__(self, name):
            return getattr(emb, name)

        def submit(self, batch):  # what iter_embeddings calls, one batch ahead of the one it hands on
            calls.append(len(batch))
            if len(calls) == 3:
                raise RuntimeError("injected fault")
            return emb.submit(batch)

    store = tmp_path / "s.h5"
    attrs = {**emb.backbone.space_attrs(), "dtype": "float16", "precision": "fp32", "device": "cpu"}
    with pytest.raises(RuntimeError, match="injected"):
        with StoreWriter(store, root=root) as writer:
            embed_batches(items, FailsOnThirdBatch(), writer, "s", attrs, batch_size=4, workers=0,
                          max_bytes=1 << 20, progress=False)
    summary = embedstore.embed(root, store, space="s", backbone=TINY_BACKBONE, weights="random", workers=0,
                               progress=False, runtime="torch", precision="fp32")
    assert (summary["skipped"], summary["embedded"]) == (8, 4)
