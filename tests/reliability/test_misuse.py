"""Damaged files and mismatched inputs, through the real `embedstore` command.

Each case must end in a one-line error that names the file (exit status 1, no traceback) or in
a recorded skip, and must leave the finished work as it was: the store's bytes, its pending
journal parts, a saved head.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import pytest
from safetensors.torch import save_file

import embedstore
from embedstore.backbones import load_backbone
from embedstore.store import list_parts
from faultkit import cli, embed_cmd
from imagegen import TINY_BACKBONE, draw_image, make_collection

pytestmark = pytest.mark.slow  # dozens of real CLI processes against damaged stores, heads and indexes: python -m pytest -m slow


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def refused(res: subprocess.CompletedProcess, *must_name: str | Path) -> str:
    """Exit status 1 with one clear ``Error:`` line naming each of ``must_name``."""
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for name in must_name:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def built(tmp_path: Path) -> dict[str, Path]:
    """A store embedded with a local weights file, its index and a saved head."""
    src = make_collection(tmp_path / "imgs", per_class=5)
    weights = tmp_path / "tiny.safetensors"
    save_file(load_backbone(TINY_BACKBONE, weights="random").model.state_dict(), str(weights))
    store = tmp_path / "s.h5"
    for cmd in (embed_cmd(src, store, weights=str(weights)), cli("index", str(store)),
                cli("classify", str(store), "--models", "logreg", "--save-head", str(tmp_path / "head"))):
        res = run(cmd)
        assert res.returncode == 0, res.stderr[-2000:]
    return {"src": src, "store": store, "weights": weights, "head": tmp_path / "head",
            "image": sorted(src.rglob("*.png"))[0]}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_damaged_store_is_refused_by_every_command_and_left_as_it_was(built: dict[str, Path], damage: str) -> None:
    store, src = built["store"], built["src"]
    data = store.read_bytes()
    if damage == "truncated":
        store.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        store.write_bytes(b"<html>not a store</html>\n" * 200)
    else:  # a valid HDF5 file of someone else's
        store.unlink()
        with h5py.File(store, "w") as f:
            f["data"] = [1, 2, 3]
    damaged = store.read_bytes()
    commands = [cli("info", str(store)), embed_cmd(src, store)]
    if damage == "truncated":  # the commonest damage, through every command that opens a store
        commands += [cli("search", str(store), "--row", "0"), cli("classify", str(store)), cli("index", str(store)),
                     cli("report", str(store), "--out", str(store.with_suffix(".html")))]
    for cmd in commands:
        refused(run(cmd), store)
        assert store.read_bytes() == damaged, f"`{cmd[3]}` changed the damaged store"  # nothing overwritten
    assert not store.with_suffix(".html").exists()


def test_pending_journal_parts_survive_a_damaged_main_file(built: dict[str, Path], tmp_path: Path) -> None:
    """A killed run's published batches are kept, not dropped, when the main file cannot be read."""
    store, src, weights = built["store"], built["src"], str(built["weights"])
    for i in range(40):
        draw_image("red_disc", 500 + i).save(src / "train" / "red_disc" / f"late_{i}.png")
    proc = subprocess.Popen(embed_cmd(src, store, batch_size=1, weights=weights), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not list_parts(store) and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    parts = {p.name: p.read_bytes() for _, p in list_parts(store)}
    if not parts:
        pytest.skip("the run ended before it published a part")
    store.write_bytes(store.read_bytes()[:100])
    refused(run(embed_cmd(src, store, weights=weights)), store)
    assert {p.name: p.read_bytes() for _, p in list_parts(store)} == parts


def test_corrupt_index_names_the_fix_and_the_fix_works(built: dict[str, Path]) -> None:
    store = built["store"]
    sidecar = next(Path(f"{store}.index").glob("*.json"))
    index_file = Path(json.loads(sidecar.read_text())["index_file"])
    index_file.write_bytes(index_file.read_bytes()[:200])
    line = refused(run(cli("search", str(store), "--row", "0")), index_file)
    assert f"embedstore index {store}" in line
    assert run(cli("index", str(store))).returncode == 0  # the fix the message gives
    hits = json.loads(run(cli("search", str(store), "--row", "0", "-k", "1", "--json")).stdout)["results"][0]
    assert hits[0]["row"] == 0


def test_tampered_or_foreign_head_is_refused_and_not_loaded(built: dict[str, Path], tmp_path: Path) -> None:
    head, image = built["head"], built["image"]
    assert run(cli("predict", str(head), str(image))).returncode == 0
    tampered = tmp_path / "tampered"
    shutil.copytree(head, tampered)
    payload = tampered / "head.skops"
    raw = bytearray(payload.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    payload.write_bytes(bytes(raw))
    assert "sha256" in refused(run(cli("predict", str(tampered), str(image))), payload)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "head.json").write_text(json.dumps({"format": "someone-elses-model/3"}))
    refused(run(cli("predict", str(foreign), str(image))), foreign / "head.json")


def test_queries_with_other_weights_are_refused(built: dict[str, Path]) -> None:
    """The weights file behind a space is replaced: queries embedded with it would not be comparable."""
    store, weights, image = built["store"], built["weights"], built["image"]
    assert run(cli("search", str(store), "--query", str(image))).returncode == 0
    state = load_backbone(TINY_BACKBONE, weights=str(weights)).model.state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 0.01
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    before = store.read_bytes()
    for cmd in (cli("search", str(store), "--query", str(image)), cli("predict", str(built["head"]), str(image))):
        assert "differ" in refused(run(cmd), weights)
    assert store.read_bytes() == before


def test_csv_naming_missing_files_records_them(tmp_path: Path) -> None:
    src = make_collection(tmp_path / "imgs", per_class=2, splits=())
    rows = [f"imgs/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(src.rglob("*.png"))]
    rows += ["imgs/red_disc/never_there.png,red_disc", "elsewhere/also missing.jpg,green_square"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "s.h5"
    res = run(embed_cmd(tmp_path / "list.csv", store))
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert (summary["embedded"], summary["failed"]) == (6, 2)
    info = json.loads(run(cli("info", str(store), "--failures", "--json")).stdout)
    failed = {Path(f["path"]).name: f["error"] for f in info["failure_list"]}
    assert failed == {"never_there.png": "FileNotFoundError", "also missing.jpg": "FileNotFoundError"}
    assert embedstore.open_store(store).n_images == 6
