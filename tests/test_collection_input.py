"""What `embed` accepts as a collection, and where it writes: default store path, CSV headers and BOM,
URL rows (schemes nothing reads refused) and empty lists refused, non-regular and oversized files refused unread, symlinks out of a
folder, and a rerun with nothing new that never loads the backbone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import embedstore
from embedstore.data import discover
from embedstore.errors import CollectionError
from embedstore_cli.main import main
from imagegen import TINY_BACKBONE, make_collection

TINY = dict(backbone=TINY_BACKBONE, weights="random", workers=0, progress=False)
TINY_ARGS = ["--backbone", TINY_BACKBONE, "--weights", "random", "--workers", "0", "--quiet"]


def _embed(*args: str) -> object:
    return CliRunner().invoke(main, ["embed", *args, *TINY_ARGS])


def _one_line_error(res, *fragments: str) -> None:
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.output, res.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ F1: default store beside the collection


def test_store_defaults_beside_a_folder(tmp_path: Path):
    folder = make_collection(tmp_path / "photos", per_class=1, splits=())
    res = _embed(str(folder))
    assert res.exit_code == 0, res.output
    expected = tmp_path.resolve() / "photos.h5"
    assert f"store: {expected}" in res.output
    assert embedstore.open_store(expected).n_images == 3


def test_store_defaults_beside_a_csv(tmp_path: Path):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    (tmp_path / "list.csv").write_text("imgs/red_disc/red_disc_000.png,red\n")
    res = _embed(str(tmp_path / "list.csv"), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["store"] == str(tmp_path.resolve() / "list.h5")
    assert embedstore.open_store(tmp_path / "list.h5").n_images == 1


# ------------------------------------------------------------------ F2: nothing new -> no backbone loaded


def test_rerun_with_nothing_new_does_not_load_the_backbone(tmp_path: Path):
    """The weights file is gone: a rerun with nothing to do still succeeds (it never loads them),
    while a run with work fails naming the file, and other weights under the same space name are refused."""
    folder = make_collection(tmp_path / "photos", per_class=1, splits=())
    weights = tmp_path / "mine.pth"
    torch.save(embedstore.load_backbone(TINY_BACKBONE, weights="random").model.state_dict(), weights)
    store = tmp_path / "s.h5"
    args = dict(backbone=TINY_BACKBONE, weights=str(weights), workers=0, progress=False)
    assert embedstore.embed(folder, store, **args)["embedded"] == 3
    weights.unlink()
    again = embedstore.embed(folder, store, **args)
    assert (again["embedded"], again["skipped"], again["images"]) == (0, 3, 3)
    assert "load_backbone" not in again["stages"]
    assert again["weights"] == str(weights)  # what built the space, from the store
    (folder / "red_disc" / "new.png").write_bytes((folder / "green_square" / "green_square_000.png").read_bytes())
    with pytest.raises(embedstore.BackboneError, match="does not exist"):
        embedstore.embed(folder, store, **args)
    other = embedstore.load_backbone("test_efficientnet", weights="random").model
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    torch.save(other.state_dict(), weights)  # same file name, so the same space name: other weights
    with pytest.raises(embedstore.StoreError, match="weights_sha256"):
        embedstore.embed(folder, store, **args)


def test_rerun_with_nothing_new_imports_no_torch(tmp_path: Path):
    """A real `embedstore embed` rerun: plans from the store alone, never imports torch or timm."""
    folder = make_collection(tmp_path / "photos", per_class=1, splits=())
    store = tmp_path / "s.h5"
    embedstore.embed(folder, store, **TINY)
    probe = ("import json, sys\nfrom embedstore_cli.main import main\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print(json.dumps([code, sorted(m for m in ('torch', 'timm') if m in sys.modules)]))")
    cmd = [sys.executable, "-c", probe, "embed", str(folder), "--store", str(store), *TINY_ARGS]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == [0, []], out.stdout + out.stderr
    assert "0 embedded, 3 skipped" in lines[-2]


# ------------------------------------------------------------------ F4/F5: CSV headers, BOM, URLs, empty lists


@pytest.mark.parametrize("header,order", [
    ("filepath,label,split", (0, 1, 2)),
    ("path,label,split", (0, 1, 2)),
    ("\ufeffpath,label,split", (0, 1, 2)),  # a UTF-8 BOM (Excel's "CSV UTF-8")
    ("image_path,class", (0, 1)),
    ("split,label,file", (2, 1, 0)),  # columns taken by name
])
def test_csv_header_names_the_columns(tmp_path: Path, header: str, order: tuple[int, ...]):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    values = ["imgs/red_disc/red_disc_000.png", "red", "validation"][: len(order)]
    row = [""] * len(order)
    for value, column in zip(values, order):
        row[column] = value
    (tmp_path / "list.csv").write_text(header + "\n" + ",".join(row) + "\n", encoding="utf-8")
    _, items = discover(tmp_path / "list.csv")
    assert [(it.rel, it.label, it.split) for it in items] == [
        (os.path.join("imgs", "red_disc", "red_disc_000.png"), "red", "val" if len(order) > 2 else "")]


def test_csv_first_row_that_is_a_file_named_like_a_column_is_data(tmp_path: Path):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    (tmp_path / "image").write_bytes((tmp_path / "imgs" / "red_disc" / "red_disc_000.png").read_bytes())
    (tmp_path / "list.csv").write_text("image,red\nimgs/red_disc/red_disc_000.png,red\n")
    _, items = discover(tmp_path / "list.csv")
    assert [it.rel for it in items] == ["image", os.path.join("imgs", "red_disc", "red_disc_000.png")]


def test_csv_with_a_bom_embeds_without_a_failure_row(tmp_path: Path):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    (tmp_path / "list.csv").write_bytes("\ufeffpath,label\nimgs/red_disc/red_disc_000.png,red\n".encode())
    summary = embedstore.embed(tmp_path / "list.csv", tmp_path / "s.h5", **TINY)
    assert (summary["embedded"], summary["failed"]) == (1, 0)


@pytest.mark.parametrize("url", ["https://example.com/a.jpg", "http://x/y.png", "memory://bucket/k.jpg",
                                 "file:///tmp/a.jpg"])
def test_csv_url_rows_are_listed_keyed_by_the_url(tmp_path: Path, url: str):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    (tmp_path / "list.csv").write_text(f"path,label\nimgs/red_disc/red_disc_000.png,red\n{url},x\n")
    _, items = discover(tmp_path / "list.csv")
    assert [(it.rel, it.label) for it in items] == [(os.path.join("imgs", "red_disc", "red_disc_000.png"), "red"),
                                                    (url, "x")]
    assert items[1].path == ("/tmp/a.jpg" if url.startswith("file:") else url)


@pytest.mark.parametrize("url,says", [("foo://x/a.jpg", "not a URL scheme fsspec knows"),
                                      ("s3://bucket/k.jpg", "s3fs"), ("gs://b/o.jpg", "gcsfs")])
def test_csv_url_rows_nothing_can_read_are_refused_naming_the_line(tmp_path: Path, url: str, says: str):
    scheme = url.split(":")[0]
    if scheme != "foo":
        pytest.importorskip("fsspec")
        import importlib.util

        if importlib.util.find_spec({"s3": "s3fs", "gs": "gcsfs"}[scheme]):
            pytest.skip(f"{scheme}:// is readable here")
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    (tmp_path / "list.csv").write_text(f"path,label\nimgs/red_disc/red_disc_000.png,red\n{url},x\n")
    res = _embed(str(tmp_path / "list.csv"), "--store", str(tmp_path / "s.h5"))
    _one_line_error(res, "list.csv", "line 3", url, says)
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("text", ["", "path,label,split\n", "# only a comment\n\n"])
def test_empty_csv_is_a_clear_error_and_writes_nothing(tmp_path: Path, text: str):
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(CollectionError, match="no images listed"):
        discover(tmp_path / "list.csv")
    res = _embed(str(tmp_path / "list.csv"), "--store", str(tmp_path / "s.h5"))
    _one_line_error(res, "list.csv", "no images listed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.csv"]  # no store, no .lock


def test_folder_without_images_is_a_clear_error_and_writes_nothing(tmp_path: Path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("no images here")
    res = _embed(str(tmp_path / "photos"))
    _one_line_error(res, "photos", "no images found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


# ------------------------------------------------------------------ reader: only regular files, bounded reads


def _cli_embed_subprocess(source: Path, store: Path) -> dict:
    """A real `embedstore embed` with a timeout: a reader that blocks on a FIFO fails the test, not hangs it."""
    cmd = [sys.executable, "-c", "from embedstore_cli.main import main; main()", "embed", str(source), "--store", str(store), *TINY_ARGS,
           "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _failures(store: Path) -> dict[str, str]:
    return {os.path.basename(f["path"]): f["error"] for f in embedstore.open_store(store).failures}


def test_fifo_and_huge_sparse_file_in_a_folder_are_recorded_not_read(tmp_path: Path):
    folder = make_collection(tmp_path / "photos", per_class=1, splits=())
    os.mkfifo(folder / "red_disc" / "pipe.jpg")
    with open(folder / "red_disc" / "huge.jpg", "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB, no disk used
    summary = _cli_embed_subprocess(folder, tmp_path / "s.h5")
    assert (summary["embedded"], summary["failed"]) == (3, 2)
    assert _failures(tmp_path / "s.h5") == {"pipe.jpg": "NotRegularFileError", "huge.jpg": "FileTooLargeError"}


def test_fifo_and_dev_zero_in_a_csv_are_recorded_not_read(tmp_path: Path):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    os.mkfifo(tmp_path / "pipe.png")
    rows = ["imgs/red_disc/red_disc_000.png,red", "pipe.png,x", "/dev/zero,x", "imgs/green_square/green_square_000.png,g"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    summary = _cli_embed_subprocess(tmp_path / "list.csv", tmp_path / "s.h5")
    assert (summary["embedded"], summary["failed"]) == (2, 2)
    assert _failures(tmp_path / "s.h5") == {"pipe.png": "NotRegularFileError", "zero": "NotRegularFileError"}
    rerun = _cli_embed_subprocess(tmp_path / "list.csv", tmp_path / "s.h5")
    assert (rerun["embedded"], rerun["known_failures"]) == (0, 2)  # recorded, not retried


def test_max_file_size_refuses_larger_files(tmp_path: Path):
    folder = make_collection(tmp_path / "photos", per_class=1, splits=())
    res = _embed(str(folder), "--max-file-size", "10", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert (summary["embedded"], summary["failed"]) == (0, 3)
    failures = embedstore.open_store(tmp_path / "photos.h5").failures
    assert {f["error"] for f in failures} == {"FileTooLargeError"}
    assert "--max-file-size" in failures[0]["message"]
    _one_line_error(_embed(str(folder), "--max-file-size", "lots"), "lots")


# ------------------------------------------------------------------ symlinks out of a folder; absolute CSV paths


def _folder_with_outside_links(tmp_path: Path) -> Path:
    folder = make_collection(tmp_path / "photos", per_class=1, splits=())
    outside = make_collection(tmp_path / "elsewhere", per_class=1, splits=())
    os.symlink(outside / "red_disc" / "red_disc_000.png", folder / "red_disc" / "linked.png")
    os.symlink(outside / "green_square", folder / "linked_dir")
    os.symlink(folder / "blue_stripes" / "blue_stripes_000.png", folder / "red_disc" / "inside.png")  # stays inside
    return folder


def test_symlinks_leaving_a_folder_are_recorded_unless_followed(tmp_path: Path):
    folder = _folder_with_outside_links(tmp_path)
    store = tmp_path / "s.h5"
    summary = embedstore.embed(folder, store, **TINY)
    assert (summary["embedded"], summary["failed"]) == (4, 2)
    failures = embedstore.open_store(store).failures
    assert {f["path"]: f["error"] for f in failures} == {
        os.path.join("red_disc", "linked.png"): "OutsideRootError", "linked_dir": "OutsideRootError"}
    assert all("--follow-symlinks" in f["message"] for f in failures)
    followed = embedstore.embed(folder, tmp_path / "f.h5", follow_symlinks=True, **TINY)
    assert (followed["embedded"], followed["failed"]) == (6, 0)


def test_cli_follow_symlinks_flag(tmp_path: Path):
    folder = _folder_with_outside_links(tmp_path)
    res = _embed(str(folder), "--follow-symlinks", "--json")
    assert res.exit_code == 0, res.output
    assert (json.loads(res.output)["embedded"], json.loads(res.output)["failed"]) == (6, 0)


def test_info_counts_absolute_paths_of_a_csv(tmp_path: Path):
    make_collection(tmp_path / "imgs", per_class=1, splits=())
    make_collection(tmp_path / "other", per_class=1, splits=())
    (tmp_path / "lists").mkdir()
    rows = [str(tmp_path / "other" / c / f"{c}_000.png") + f",{c}" for c in ("red_disc", "green_square")]
    rows.append("../imgs/blue_stripes/blue_stripes_000.png,blue")  # relative, but outside the CSV's folder
    (tmp_path / "lists" / "list.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "s.h5"
    assert embedstore.embed(tmp_path / "lists" / "list.csv", store, **TINY)["embedded"] == 3
    res = CliRunner().invoke(main, ["info", str(store)])
    assert res.exit_code == 0 and "paths: 3 absolute (outside the root)" in res.output, res.output
    res = CliRunner().invoke(main, ["info", str(store), "--json"])
    assert json.loads(res.output)["absolute_paths"] == 3
    inside = tmp_path / "s2.h5"
    embedstore.embed(tmp_path / "imgs", inside, **TINY)
    assert "paths:" not in CliRunner().invoke(main, ["info", str(inside)]).output


@pytest.mark.parametrize("content,says", [
    (b"path\nimgs/a.png\x00,red\n", "not a readable CSV"),
    ("caf\u00e9.png,red\n".encode("latin-1"), "not UTF-8"),
])
def test_unreadable_csv_is_one_line_naming_the_file(tmp_path: Path, content: bytes, says: str):
    (tmp_path / "list.csv").write_bytes(content)
    _one_line_error(_embed(str(tmp_path / "list.csv"), "--store", str(tmp_path / "s.h5")), "list.csv", says)
    assert not (tmp_path / "s.h5").exists()
