"""A real embed process SIGKILLed mid-run resumes to the same store as an uninterrupted run, for each new
source: a folder of tar shards, a CSV of URLs served over HTTP, and a Hugging Face dataset (issue 20)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from faultkit import embed_cmd, kill_resume_compare
from imagegen import TINY_BACKBONE
from sourcegen import ImageServer, hf_dataset, write_shard

N = 120


def cli(src: str, store: Path) -> list[str]:
    return embed_cmd(src, store, backbone=TINY_BACKBONE)


def hf_script(saved: Path, store: Path) -> list[str]:
    code = ("import sys, datasets, embedstore\n"
            "ds = datasets.load_from_disk(sys.argv[1])\n"
            f"embedstore.embed(ds, sys.argv[2], backbone={TINY_BACKBONE!r}, weights='random', batch_size=4, "
            "workers=0, precision='fp32', progress=False)\n")
    return [sys.executable, "-c", code, str(saved), str(store)]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_tar_shards(tmp_path: Path):
    root = tmp_path / "shards"
    for k in range(4):
        write_shard(root / f"shard-{k:03d}.tar", k * N // 4, N // 4, label="json" if k % 2 else "cls")
    expected = {f"shard-{i * 4 // N:03d}.tar/sample{i:05d}.jpg" for i in range(N)}
    kill_resume_compare(tmp_path, lambda store: cli(str(root), store), expected)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_urls(tmp_path: Path):
    with ImageServer() as server:
        urls = [f"{server.url}/img/{i}.{'png' if i % 2 else 'jpg'}" for i in range(N)]
        (tmp_path / "urls.csv").write_text("url\n" + "\n".join(urls) + "\n")
        hits_after_kill: dict[str, int] = {}

        def command(store: Path) -> list[str]:
            if store.name == "reference.h5" and not hits_after_kill:
                hits_after_kill.update(server.hits)  # the rerun is done: count before the reference run
            return cli(str(tmp_path / "urls.csv"), store)

        done_before = kill_resume_compare(tmp_path, command, set(urls))
        for url in done_before:  # embedded before the kill: not downloaded again by the rerun
            assert hits_after_kill[url[len(server.url):]] == 1, url


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_hf_dataset(tmp_path: Path):
    pytest.importorskip("datasets")
    saved = tmp_path / "ds"
    ds = hf_dataset(N)
    ds.save_to_disk(str(saved))
    kill_resume_compare(tmp_path, lambda store: hf_script(saved, store), {f"dataset/{i}" for i in range(N)})
