"""Search and index at their edges: --exclude-self, empty filters, huge k, tampered sidecars,
factory strings that cannot be trained, and the calibrated duplicates threshold."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import embedstore
from conftest import SHARED
from embedstore.errors import QueryError
from embedstore.index import index_files, load_index
from embedstore.search import DUPLICATES_THRESHOLD, duplicates, search
from embedstore.store import open_store
from embedstore_cli.main import main


@pytest.fixture
def cli() -> click.Group:
    return main


def rows_of(hits: list[dict]) -> list[int]:
    return [h["row"] for h in hits]


# --------------------------------------------------------------------------- exclude_self


def test_exclude_self_drops_the_query_row_and_keeps_k_hits(tiny_store: Path, collection: Path, tmp_path: Path,
                                                           cli: click.Group) -> None:
    st = open_store(tiny_store)
    sp = st.space()
    row, path = int(sp.rows[4]), str(sp.paths[4])
    plain = search(tiny_store, rows=[row], k=5)["results"][0]
    assert plain[0]["row"] == row  # without the flag the query finds itself first
    by_row = search(tiny_store, rows=[row], k=5, exclude_self=True)["results"][0]
    assert row not in rows_of(by_row) and rows_of(by_row) == rows_of(plain)[1:] + rows_of(by_row)[4:]
    assert len(by_row) == 5
    assert search(tiny_store, paths=[path], k=5, exclude_self=True)["results"][0] == by_row
    stored_file = collection / path
    by_file = search(tiny_store, images=[str(stored_file)], k=5, exclude_self=True)["results"][0]
    assert row not in rows_of(by_file) and len(by_file) == 5
    outside = tmp_path / "elsewhere" / "same_bytes.png"  # not in the store, same content as row 4
    outside.parent.mkdir()
    shutil.copy(stored_file, outside)
    by_hash = search(tiny_store, images=[str(outside)], k=5, exclude_self=True)["results"][0]
    assert row not in rows_of(by_hash) and len(by_hash) == 5
    everything = search(tiny_store, rows=[row], k=1000, exclude_self=True)
    assert len(everything["results"][0]) == len(sp) - 1 and any("k=1000" in n for n in everything["notes"])

    out = CliRunner().invoke(cli, ["search", str(tiny_store), "--row", str(row), "-k", "3", "--exclude-self",
                                   "--json"])
    assert out.exit_code == 0, out.output
    hits = json.loads(out.stdout)["results"][0]
    assert row not in rows_of(hits) and len(hits) == 3


# --------------------------------------------------------------------------- filters and k


def test_filter_matching_nothing_names_the_values_there_are(tiny_store: Path, cli: click.Group) -> None:
    with pytest.raises(QueryError, match=r"label=cta.*labels are blue_stripes, green_square, red_disc"):
        search(tiny_store, rows=[0], where={"label": "cta"})
    out = CliRunner().invoke(cli, ["search", str(tiny_store), "--row", "0", "--where", "split=tset"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "split=tset" in out.output and "splits are train, val" in out.output
    both = CliRunner().invoke(cli, ["search", str(tiny_store), "--row", "0", "--where", "split=val",
                                    "--where", "label=cta"])
    assert both.exit_code == 1 and "split=val and label=cta" in both.output


def test_huge_k_is_clamped_before_anything_is_allocated(tiny_store: Path) -> None:
    cmd = [sys.executable, "-m", "embedstore_cli.main"] if shutil.which("embedstore") is None else ["embedstore"]
    done = subprocess.run([*cmd, "search", str(tiny_store), "--row", "0", "-k", "1000000000", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert len(payload["results"][0]) == 36 and payload["k"] == 36
    assert any("k=1000000000" in n and "36" in n for n in payload["notes"])
    filtered = search(tiny_store, rows=[0], k=10**9, where={"split": "val"})
    assert len(filtered["results"][0]) == 18 and filtered["k"] == 18
    dups = subprocess.run([*cmd, "duplicates", str(tiny_store), "-k", "1000000000", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert dups.returncode == 0, dups.stderr
    assert json.loads(dups.stdout)["images"] == 36
    for bad in (0, -3):
        with pytest.raises(QueryError, match="k must be at least 1"):
            search(tiny_store, rows=[0], k=bad)
        with pytest.raises(QueryError, match="k must be at least 1"):
            duplicates(tiny_store, k=bad)


# --------------------------------------------------------------------------- tampered sidecars


TAMPERED = {
    "a list": lambda info: [],
    "null": lambda info: None,
    "string params": lambda info: {**info, "params": "fast"},
    "huge generation": lambda info: {**info, "generation": 10**40},
    "negative generation": lambda info: {**info, "generation": -1},
    "params of another kind": lambda info: {**info, "params": {"nprobe": 8}},
    "huge efSearch": lambda info: {**info, "params": {"efSearch": 10**12}},
    "string rows": lambda info: {**info, "rows": "36"},
    "broken curve": lambda info: {**info, "tuning_curve": [1, 2]},
}


@pytest.mark.parametrize("how", list(TAMPERED))
def test_tampered_sidecar_means_no_usable_index(tiny_store: Path, cli: click.Group, how: str) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["index", str(tiny_store)]).exit_code == 0
    files = index_files(tiny_store, open_store(tiny_store).space().name)
    files.sidecar.write_text(json.dumps(TAMPERED[how](json.loads(files.sidecar.read_text()))))

    found = runner.invoke(cli, ["search", str(tiny_store), "--row", "0", "-k", "3", "--json"])
    assert found.exit_code == 0 and "Traceback" not in found.output, found.output
    payload = json.loads(found.stdout)
    assert payload["exact"] and payload["results"][0][0]["row"] == 0
    assert any("no usable index" in n and str(files.sidecar) in n for n in payload["notes"])
    assert "no usable index" in runner.invoke(cli, ["search", str(tiny_store), "--row", "0"]).stderr
    assert duplicates(tiny_store)["exact"]

    fixed = runner.invoke(cli, ["index", str(tiny_store)])
    assert fixed.exit_code == 0 and "Traceback" not in fixed.output, fixed.output
    assert "built in" in fixed.output and "unusable" in fixed.stderr
    assert load_index(tiny_store).index.ntotal == 36
    assert not search(tiny_store, rows=[0], k=3)["exact"]


def test_index_never_echoes_a_path_from_the_sidecar(tiny_store: Path, cli: click.Group, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["index", str(tiny_store)]).exit_code == 0
    files = index_files(tiny_store, open_store(tiny_store).space().name)
    info = json.loads(files.sidecar.read_text())
    bait = str(tmp_path / "somewhere" / "else.faiss")
    files.sidecar.write_text(json.dumps({**info, "index_file": bait}))
    again = runner.invoke(cli, ["index", str(tiny_store)])
    assert again.exit_code == 0 and "up to date" in again.output
    assert bait not in again.output and str(files.index) in again.output
    assert json.loads(runner.invoke(cli, ["index", str(tiny_store), "--json"]).stdout)["index_file"] == str(files.index)


# --------------------------------------------------------------------------- factory strings


def test_factory_that_cannot_be_trained_on_the_rows_is_refused(tiny_store: Path, cli: click.Group) -> None:
    runner = CliRunner()
    ivf = runner.invoke(cli, ["index", str(tiny_store), "--kind", "IVF4096,Flat"])
    assert ivf.exit_code == 1 and "Traceback" not in ivf.output
    assert "IVF4096,Flat" in ivf.output and "36 vectors" in ivf.output and "4096" in ivf.output
    assert "--kind flat" in ivf.output and "faiss::" not in ivf.output
    pq = runner.invoke(cli, ["index", str(tiny_store), "--kind", "PQ8"])  # 8-bit codes: 256 centroids
    assert pq.exit_code == 1 and "256" in pq.output and "faiss::" not in pq.output
    garbage = runner.invoke(cli, ["index", str(tiny_store), "--kind", "IVFxx,Flat"])
    assert garbage.exit_code == 1 and "unknown index kind 'IVFxx,Flat'" in garbage.output
    assert "could not parse index string" in garbage.output and "faiss::" not in garbage.output
    small = runner.invoke(cli, ["index", str(tiny_store), "--kind", "IVF4,Flat", "--json"])
    assert small.exit_code == 0, small.output  # a layout that fits the rows still builds
    assert json.loads(small.stdout)["factory"] == "IVF4,Flat"


# --------------------------------------------------------------------------- duplicates threshold


def test_cli_default_threshold_is_the_library_one(tiny_store: Path, cli: click.Group) -> None:
    runner = CliRunner()
    assert f"default: {DUPLICATES_THRESHOLD}" in runner.invoke(cli, ["duplicates", "--help"]).output
    out = runner.invoke(cli, ["duplicates", str(tiny_store), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["threshold"] == DUPLICATES_THRESHOLD


@pytest.mark.slow
def test_resized_reencoded_photos_are_duplicates_at_the_default_threshold(tmp_path: Path) -> None:
    """The first 8 photos of each hymenoptera val class with a 160-px JPEG copy each. With the
    default backbone the copies sit at cosine 0.77-0.88 from their originals (0.95 finds none);
    the calibrated default finds most of them and never groups two different photos."""
    from PIL import Image

    source = SHARED / "hymenoptera" / "val"
    if not source.is_dir():
        pytest.skip("../shared/datasets/hymenoptera is absent")
    photos = [p for c in ("ants", "bees") for p in sorted((source / c).glob("*.jpg"))[:8]]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)  # a temporary copy, outside the repository
        with Image.open(p) as im:  # a 160-px, re-encoded copy, as a re-upload would make
            im = im.convert("RGB")
            scale = 160 / min(im.size)
            im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BICUBIC).save(
                folder / f"copy_{p.stem}.jpg", "JPEG", quality=90)
    store = tmp_path / "photos.h5"
    embedstore.embed(folder, store, workers=0, progress=False)  # the default backbone, pretrained

    def found(threshold: float | None) -> int:
        groups = duplicates(store, **({} if threshold is None else {"threshold": threshold}))["groups"]
        pairs = [{m["path"] for m in g["members"]} for g in groups]
        assert all(len(g) == 2 and {x.removeprefix("copy_").split(".")[0] for x in g} == {min(g).split(".")[0]}
                   for g in pairs), groups  # only a photo and its own copy
        return sum({p.name, f"copy_{p.stem}.jpg"} in pairs for p in photos)

    assert found(0.95) == 0  # the old default
    assert found(None) >= len(photos) // 2  # 10 of 16 when calibrated (benchmarks/duplicates.py)
