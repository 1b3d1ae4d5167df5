"""Recipe: one IVF index over many store or shard files, with the inverted lists on disk (larger than RAM).

Crash safety: the trained index, each block and the populated index are written atomically
(temporary file, fsync, rename); ``merged.ivfdata`` is written by FAISS in place, so
``manifest.json``, written atomically last, is what marks a complete build: a folder without it
(a build killed half-way) is incomplete and is rebuilt from scratch by running the build again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import faiss
import h5py
import numpy as np

from .._atomic import atomic_write, atomic_write_text
from .._vectors import l2_normalize
from ..errors import IndexFileError, StoreError


def _space_of(path: Path, space: str | None) -> str:
    """The space of ``path`` to index: ``space`` if the file has it, its first space if None, else ""."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            names = list(f["spaces"])
    except (OSError, KeyError) as e:
        raise StoreError(f"{path} is not a readable shard or store file ({e}): list store or shard files only") from e
    if space is None:
        return names[0] if names else ""
    return space if space in names else ""


def _write_index(index: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))


def build_ivf_on_disk(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    space: str | None = None,
    nlist: int | None = None,
    factory: str | None = None,
    train_size: int | None = None,
    chunk: int = 65536,
    seed: int = 0,
) -> dict[str, Any]:
    """Recipe: one IVF index over many store/shard files, never holding all vectors in memory.

    1. train ``IVF{nlist},Flat`` (or ``factory``, any IVF, e.g. ``IVF65536,PQ64``) on a random
       sample drawn from every file (cosine: L2-normalised float32, inner product);
    2. for each file independently (in parallel on other machines if you like): load the trained
       index, ``add_with_ids`` the file's vectors in chunks, write ``block-KKKKK.index``;
    3. ``merge_ondisk`` the blocks' inverted lists into ``merged.ivfdata`` (mmap; only the
       coarse quantizer stays in RAM) and write ``populated.index`` beside it.

    Ids are global: ``offset[file] + row``, where ``row`` is the row of the file's images table
    and ``offset`` is the sum of the images of the earlier files (``manifest.json``); for a single
    store that is the store row, as in :mod:`embedstore.index`. Search with :func:`search_ivf_on_disk`.
    Returns the manifest.
    """
    from faiss.contrib.ondisk import merge_ondisk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the folder is incomplete until the new manifest
    files = [Path(s) for s in sources]
    entries, offset = [], 0
    for p in files:
        name = _space_of(p, space)
        with h5py.File(p, "r", locking=False) as f:
            n_images = len(f["images/path"])
            n_vec = len(f[f"spaces/{name}/rows"]) if name else 0
            dim = int(f[f"spaces/{name}/vectors"].shape[1]) if name else 0
        entries.append({"file": str(p.absolute()), "space": name, "offset": offset, "images": n_images,
                        "vectors": n_vec, "dim": dim})
        offset += n_images
    with_vectors = [e for e in entries if e["vectors"]]
    if not with_vectors:
        raise StoreError(f"none of {len(files)} files holds vectors of space {space!r}: embed them first")
    dim = with_vectors[0]["dim"]
    total = sum(e["vectors"] for e in with_vectors)
    nlist = nlist or max(1, min(65536, int(4 * np.sqrt(total))))
    factory = factory or f"IVF{nlist},Flat"
    trained = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(trained)
    train_size = min(total, train_size or max(64 * ivf.nlist, 10000))

    # 1. a sample proportional to each file's size
    rng = np.random.default_rng(seed)
    sample = []
    for e in with_vectors:
        k = max(1, round(train_size * e["vectors"] / total))
        pick = np.sort(rng.choice(e["vectors"], size=min(k, e["vectors"]), replace=False))
        with h5py.File(e["file"], "r", locking=False) as f:
            sample.append(l2_normalize(f[f"spaces/{e['space']}/vectors"][pick]))
    x = np.ascontiguousarray(np.concatenate(sample))
    trained.train(x)
    trained_path = out / "trained.index"
    _write_index(trained, trained_path)

    # 2. one block per file: this step is what workers run independently
    blocks = []
    for k, e in enumerate(entries):
        if not e["vectors"]:
            continue
        block = faiss.read_index(str(trained_path))
        with h5py.File(e["file"], "r", locking=False) as f:
            vec, rows = f[f"spaces/{e['space']}/vectors"], f[f"spaces/{e['space']}/rows"]
            for s in range(0, e["vectors"], chunk):
                block.add_with_ids(l2_normalize(vec[s:s + chunk]), rows[s:s + chunk].astype(np.int64) + e["offset"])
        path = out / f"block-{k:05d}.index"
        _write_index(block, path)
        blocks.append(str(path))
        del block

    # 3. merge the inverted lists on disk
    index = faiss.read_index(str(trained_path))
    merge_ondisk(index, blocks, str(out / "merged.ivfdata"))
    _write_index(index, out / "populated.index")
    manifest = {"factory": factory, "nlist": int(ivf.nlist), "dim": dim, "vectors": int(index.ntotal),
                "train_size": int(len(x)), "files": entries, "blocks": blocks,
                "index": str(out / "populated.index"), "ivfdata": str(out / "merged.ivfdata")}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def search_ivf_on_disk(out_dir: str | os.PathLike, queries: np.ndarray, k: int = 10,
                       nprobe: int = 16) -> tuple[np.ndarray, np.ndarray, list[list[tuple[str, int]]]]:
    """Search an index built by :func:`build_ivf_on_disk`: (scores, ids, [(file, row), ...] per query)."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise IndexFileError(f"{out / 'manifest.json'} is missing or unreadable ({e}): the on-disk index in {out} "
                             "is incomplete; run build_ivf_on_disk again") from None
    index = faiss.read_index(str(out / "populated.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    faiss.extract_index_ivf(index).nprobe = nprobe
    q = l2_normalize(np.asarray(queries, dtype=np.float32).reshape(-1, manifest["dim"]))
    scores, ids = index.search(q, k)
    offsets = np.array([e["offset"] for e in manifest["files"]])
    where = []
    for row in ids:
        hits = []
        for gid in row:
            if gid < 0:
                continue
            j = int(np.searchsorted(offsets, gid, side="right") - 1)
            hits.append((manifest["files"][j]["file"], int(gid - offsets[j])))
        where.append(hits)
    return scores, ids, where
