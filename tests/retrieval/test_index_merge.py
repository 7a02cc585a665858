"""The chunk merge (``mmlm.retrieval.merge``) streams: keys first, then one chunk at a time written to its rows.
Its version is the one the earlier merge wrote with every chunk concatenated in memory (the reference below):
the same ids, ``.npy`` bytes, SQLite rows and manifest counts; and its memory does not hold every embedding."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

from mmlm.retrieval import Index
from mmlm.retrieval.index import EMBEDDINGS, MANIFEST, METADATA, TEXT_IDS
from mmlm.retrieval.merge import merge
from mmlm.retrieval.options import Job, Options
from mmlm.retrieval.work import Work
from mmlm.retrieval.write import write_index

ROOT = Path(__file__).resolve().parents[2]
JOB = Job("build", "vectors", "0" * 64, "synthetic", "", "", None, None, None, 0, 1)


def item(key: int) -> dict[str, Any]:
    """Item ``key``: no caption for every third, up to four for the others; some columns only on some items
    (first seen on a later chunk than another's), one named ``id`` (kept as ``id_``), a skip on every 7th."""
    meta: dict[str, Any] = {"filepath": f"{key:05d}.jpg"}
    if key % 5 == 3:
        meta["width"] = key
    if key % 11 == 4:
        meta = {"tags": ["a", str(key)], **meta, "id": f"x{key}"}
    captions = [] if key % 3 == 0 else [f"photo {key} take {j}" for j in range(key % 4 + 1)]
    return {"meta": meta, "captions": captions, "skips": ["unreadable"] if key % 7 == 0 else []}


def two_ranks(work: Work, keys: np.ndarray, dim: int, per_chunk: int, run: str, seed: int, first: int = 0) -> None:
    """Chunks of ``keys`` as a 2-rank build writes them: rank r embeds keys[r::2], ``per_chunk`` a chunk."""
    rng = np.random.default_rng(seed)
    for rank in range(2):
        mine = keys[rank::2]
        for seq, start in enumerate(range(0, len(mine), per_chunk)):
            chunk = mine[start : start + per_chunk]
            items = [item(int(k)) for k in chunk]
            text_key = np.array([k for k, it in zip(chunk, items) for _ in it["captions"]], dtype=np.int64)
            arrays = {"key": chunk.astype(np.int64), "image": rng.standard_normal((len(chunk), dim), np.float32)}
            if len(text_key):
                arrays |= {"text": rng.standard_normal((len(text_key), dim), np.float32), "text_key": text_key}
            work.write_chunk(f"{run}-r{rank:04d}-{first + seq:06d}", arrays, items)


def in_memory_merge(work: Work) -> dict[str, Any]:
    """The earlier merge, every chunk concatenated in memory: the order the streamed one must give."""
    keys, images, texts, text_keys, items = [], [], [], [], []
    for path in sorted(work.chunks.glob("*.npz")):
        with np.load(path) as z:
            keys.append(z["key"])
            images.append(z["image"])
            if "text" in z.files:
                texts.append(z["text"])
                text_keys.append(z["text_key"])
            items += json.loads(z["items"].tobytes())
    key = np.concatenate(keys)
    order = np.argsort(key, kind="stable")
    text_key = np.concatenate(text_keys)
    text_order = np.argsort(text_key, kind="stable")
    return {"image": np.concatenate(images)[order], "text": np.concatenate(texts)[text_order],
            "text_owner": np.searchsorted(key[order], text_key[text_order]), "items": [items[i] for i in order]}  # fmt: skip


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def expected_metadata(items: list[dict[str, Any]], offset: int, text_row: int) -> tuple[list[str], list, list]:
    """The columns, item rows (``{column: value}``, NULLs left out) and text rows that one write of ``items``
    in id order gives: what the in-memory merge's ``write_metadata`` wrote."""
    rows = []
    for i, it in enumerate(items):
        row = {("id_" if k == "id" else k): v if isinstance(v, (str, int)) else json.dumps(v) for k, v in it["meta"].items()}
        if it["captions"]:
            row["caption"] = it["captions"][0]
        rows.append({"id": offset + i, **row})
    columns = list(dict.fromkeys(c for row in rows for c in row))
    captions = [(offset + i, c) for i, it in enumerate(items) for c in it["captions"]]
    return columns, rows, [(text_row + j, i, c) for j, (i, c) in enumerate(captions)]


def read_metadata(path: Path, ids: range) -> tuple[list[str], list, list]:
    """The columns of ``path``'s items, and the item and text rows of ``ids``, as ``expected_metadata`` gives them."""
    where = f"WHERE id BETWEEN {ids.start} AND {ids.stop - 1}"
    with closing(sqlite3.connect(path)) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(items)")]
        items = [{c: v for c, v in zip(columns, row) if v is not None}
                 for row in db.execute(f"SELECT * FROM items {where} ORDER BY id")]  # fmt: skip
        texts = db.execute(f"SELECT row, id, caption FROM texts {where} ORDER BY row").fetchall()
    return columns, items, texts


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_streamed_merge_writes_what_the_in_memory_merge_wrote(tmp_path, dtype):
    """Two ranks' interleaved chunks (one from an earlier, resumed pass), items with several captions or none,
    columns first seen late: the version is byte for byte the earlier in-memory merge's; then an ``add``."""
    work = Work(tmp_path / "ix")
    work.chunks.mkdir(parents=True)
    work.counts.mkdir()
    keys = np.random.default_rng(0).permutation(45)  # any key order within a rank's share
    two_ranks(work, np.sort(keys[:8]), 8, 2, "aaaa", seed=1)  # the pass a resume continues
    two_ranks(work, np.sort(keys[8:]), 8, 3, "bbbb", seed=2, first=0)
    (work.counts / "bbbb-r0000.json").write_text(json.dumps({"counts": {"unreadable": 2, "too_small": 1}}))
    reference = in_memory_merge(work)
    n, n_texts = 45, len(reference["text"])

    merged, skipped = merge(work, "bbbb")
    sorted_keys = np.sort(keys[:8])
    skips_before = sum(1 for k in sorted_keys if k % 7 == 0)  # an earlier pass's items bring their skips
    assert skipped == {"too_small": 1, "unreadable": 2 + skips_before}
    assert merged.n == n and merged.dim == 8
    np.testing.assert_array_equal(merged.text_owner, reference["text_owner"])

    options = Options(dtype=dtype, index_type="Flat")
    write_index(tmp_path / "v1", merged, skipped, JOB, options, None, "caption", nn.Identity(), 0.0)
    folder = tmp_path / "v1"
    text_ids = reference["text_owner"].astype(np.int64)
    assert (folder / EMBEDDINGS["image"]).read_bytes() == npy_bytes(reference["image"].astype(dtype))
    assert (folder / EMBEDDINGS["text"]).read_bytes() == npy_bytes(reference["text"].astype(dtype))
    assert (folder / TEXT_IDS).read_bytes() == npy_bytes(text_ids)
    assert read_metadata(folder / METADATA, range(n)) == expected_metadata(reference["items"], 0, 0)
    assert not list(folder.glob("*.staging"))  # the scratch database is gone
    manifest = json.loads((folder / MANIFEST).read_text())
    per_item = max(len(it["captions"]) for it in reference["items"])
    assert manifest["counts"] == {"items": n, "texts": n_texts, "max_texts_per_item": per_item} and per_item == 4
    assert manifest["embedding"]["dim"] == 8 and manifest["skipped"] == skipped

    # an add: the base's rows copied first, the new ids and text rows continuing its own
    more = Work(tmp_path / "more")
    more.chunks.mkdir(parents=True)
    more.counts.mkdir()
    two_ranks(more, np.arange(100, 120), 8, 4, "cccc", seed=3)
    added = in_memory_merge(more)
    with Index.open(folder) as base:
        merged, skipped = merge(more, "cccc")
        write_index(tmp_path / "v2", merged, skipped, JOB, options, base, "caption", nn.Identity(), 0.0)
    v2 = tmp_path / "v2"
    both = {m: np.concatenate([reference[m], added[m]]).astype(dtype) for m in ("image", "text")}
    assert (v2 / EMBEDDINGS["image"]).read_bytes() == npy_bytes(both["image"])
    assert (v2 / EMBEDDINGS["text"]).read_bytes() == npy_bytes(both["text"])
    assert (v2 / TEXT_IDS).read_bytes() == npy_bytes(np.concatenate([text_ids, n + added["text_owner"]]))
    columns, items, texts = read_metadata(v2 / METADATA, range(n, n + 20))
    want_columns, want_items, want_texts = expected_metadata(added["items"], n, n_texts)
    assert items == want_items and texts == want_texts
    base_columns = read_metadata(folder / METADATA, range(0))[0]
    assert columns == base_columns + [c for c in want_columns if c not in base_columns]
    assert read_metadata(v2 / METADATA, range(n))[1:] == read_metadata(folder / METADATA, range(n))[1:]


def test_the_columns_keep_the_order_of_their_first_item(tmp_path):
    """A column first seen on an early id but in a late chunk comes before one seen on a later id in an early
    chunk: the table reads as one write of every item in id order."""
    work = Work(tmp_path / "ix")
    work.chunks.mkdir(parents=True)
    work.counts.mkdir()
    for name, key, meta in (("r-r0000-000000", 5, {"b": 1}), ("r-r0001-000000", 2, {"a": 1})):
        arrays = {"key": np.array([key], np.int64), "image": np.ones((1, 4), np.float32)}
        work.write_chunk(name, arrays, [{"meta": {"filepath": f"{key}.jpg", **meta}, "captions": [], "skips": []}])
    merged, skipped = merge(work, "r")
    write_index(tmp_path / "v", merged, skipped, JOB, Options(index_type="Flat"), None, "caption", nn.Identity(), 0.0)
    columns, items, _ = read_metadata(tmp_path / "v" / METADATA, range(2))
    assert columns == ["id", "filepath", "a", "b"]
    assert items == [{"id": 0, "filepath": "2.jpg", "a": 1}, {"id": 1, "filepath": "5.jpg", "b": 1}]


def test_a_key_in_two_chunks_is_refused(tmp_path):
    work = Work(tmp_path / "ix")
    work.chunks.mkdir(parents=True)
    work.counts.mkdir()
    for name in ("r-r0000-000000", "r-r0001-000000"):
        arrays = {"key": np.array([3], np.int64), "image": np.ones((1, 4), np.float32)}
        work.write_chunk(name, arrays, [{"meta": {}, "captions": [], "skips": []}])
    with pytest.raises(RuntimeError, match="embedded twice"):
        merge(work, "r")


# A fresh process, so that nothing other tests allocated counts; VmHWM (the kernel's exact high-water mark of
# resident memory) reset once the chunks are written, read after the merge.
MEMORY = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from mmlm.retrieval.merge import merge
    from mmlm.retrieval.work import Work
    from mmlm.retrieval.write import write_rows

    def status(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1]) * 1024

    tmp, n, dim, per_chunk = Path(sys.argv[1]), *map(int, sys.argv[2:])
    work = Work(tmp / "ix")
    work.chunks.mkdir(parents=True)
    work.counts.mkdir()
    rng = np.random.default_rng(0)
    for rank in range(2):  # interleaved: each chunk's rows go to every other row of the files
        for seq, start in enumerate(range(rank, n, 2 * per_chunk)):
            keys = np.arange(start, min(n, start + 2 * per_chunk), 2)
            arrays = {"key": keys, "image": rng.standard_normal((len(keys), dim), np.float32),
                      "text": rng.standard_normal((len(keys), dim), np.float32), "text_key": keys}
            items = [{"meta": {"filepath": f"{k}.jpg"}, "captions": [f"photo {k}"], "skips": []} for k in keys]
            work.write_chunk(f"r-r{rank}-{seq:06d}", arrays, items)
            del arrays, items
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    merged, _ = merge(work, "r")
    (tmp / "v").mkdir()
    write_rows(tmp / "v", merged, None, np.dtype("float32"), "caption")
    print(json.dumps({"growth": status("VmHWM") - before, "before": before}))
""")


@pytest.mark.slow  # a process that imports torch and writes 82 MB of chunks: 5 s alone, 16 s beside other tests
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_the_merge_holds_one_chunk_not_every_embedding(tmp_path):
    n, dim, per_chunk = 40_000, 256, 2048
    total = 2 * n * dim * 4  # image and text embeddings: 82 MB, 20 chunks per rank
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path), str(n), str(dim), str(per_chunk)], env=env,
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    image = np.load(tmp_path / "v" / EMBEDDINGS["image"], mmap_mode="r")
    assert image.shape == (n, dim) and np.isfinite(image[n - 1]).all() and image[n - 1].any()  # every row written
    print(f"[merge] {total / 1e6:.0f} MB of embeddings, peak RSS growth {out['growth'] / 1e6:.1f} MB")
    assert out["growth"] < total / 5  # measured: 13-15 MB, a few copies of one 2 MB chunk; in memory it was > 82 MB
