"""`mmlm index sync`: a folder of generated images, built, then changed (3 changed, 2 deleted, 2 renamed, 4
added): the sync embeds exactly the 7 new and changed images, keeps the renamed ones' vectors under their new
paths, drops the deleted ones, and answers as a full rebuild of the folder does; a sync killed at a step leaves
the previous index answering, and a rerun finishes it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlm import outputs
from mmlm.cli import main
from mmlm.models.clip import CLIP
from mmlm.retrieval import Index, build_index
from mmlm.retrieval.sync import sync_index

ROOT = Path(__file__).resolve().parents[2]
N = 240  # images in the folder: a few hundred, 32x32 noise, each from its own seed
QUERIES = 6

pytestmark = pytest.mark.usefixtures("one_thread")


def noise(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_folder(folder: Path, n: int = N) -> Path:
    for i in range(n):
        noise(folder / ("sub" if i % 5 == 0 else "") / f"{i:04d}.png", i)
    return folder


def change(folder: Path) -> dict[str, list[str]]:
    """3 changed, 2 deleted, 2 renamed (one into another folder), 4 added, 1 touched (not a change)."""
    for name in ("0001.png", "0002.png", "0003.png"):
        noise(folder / name, 10_000 + int(name[:4]))
    for name in ("0006.png", "0007.png"):
        (folder / name).unlink()
    os.rename(folder / "0008.png", folder / "renamed.png")
    os.rename(folder / "0009.png", folder / "sub" / "moved.png")
    for i in range(4):
        noise(folder / "new" / f"n{i}.png", 20_000 + i)
    os.utime(folder / "0011.png", ns=(10**18, 10**18))  # another mtime, the same bytes
    return {
        "deleted": ["0006.png", "0007.png"],
        "renamed": [("0008.png", "renamed.png"), ("0009.png", "sub/moved.png")],
    }


def path_answers(index: Index, k: int = 10) -> tuple[list[list[str]], np.ndarray]:
    """The filepaths and scores of fixed queries (seeded random directions): comparable across id orders."""
    queries = np.random.default_rng(0).standard_normal((QUERIES, index.dim)).astype(np.float32)
    ids, scores = index.search(queries, k=k)
    return [[m["filepath"] for m in index.metadata(row)] for row in ids], scores


def by_path(index: Index) -> dict[str, int]:
    return {m["filepath"]: i for i, m in enumerate(index.metadata(np.arange(len(index))))}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """An index of the generated folder (built once; tests copy both)."""
    base = tmp_path_factory.mktemp("built")
    make_folder(base / "images")
    index = build_index("clip-tiny", str(base / "images"), base / "ix", batch_size=64, accelerator="cpu")
    assert index is not None
    index.close()
    return base


def copy_of(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The folder and its index, copied as they are (the manifest names the folder: it is rewritten to the copy)."""
    shutil.copytree(built / "images", tmp_path / "images", copy_function=shutil.copy2)  # mtimes kept
    shutil.copytree(built / "ix", tmp_path / "ix")
    for manifest in (tmp_path / "ix").glob("v*/manifest.json"):
        manifest.write_text(manifest.read_text().replace(str(built / "images"), str(tmp_path / "images")))
    outputs.mark(tmp_path / "ix", "index")
    return tmp_path / "images", tmp_path / "ix"


def test_build_records_each_files_mtime_size_and_sha256(built):
    with Index.open(built / "ix") as index:
        row = index.metadata([by_path(index)["0001.png"]])[0]
        stat = (built / "images" / "0001.png").stat()
        assert row["mtime"] == stat.st_mtime_ns and row["size"] == stat.st_size
        assert row["sha256"] == hashlib.sha256((built / "images" / "0001.png").read_bytes()).hexdigest()
        assert (
            index.metadata([by_path(index)["sub/0005.png"]])[0]["size"]
            == (built / "images/sub/0005.png").stat().st_size
        )


def test_sync_embeds_only_the_new_and_changed_and_matches_a_rebuild(built, tmp_path, monkeypatch, capsys):
    images, ix = copy_of(built, tmp_path)
    old = Index.open(ix)  # a server holding the version before the sync
    before = by_path(old)
    changed = change(images)
    encoded = []  # images through the model, whoever calls it
    original = CLIP.encode_image

    def counting(self, images, *args, **kwargs):
        encoded.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(CLIP, "encode_image", counting)

    main(["index", "sync", str(ix)])
    out = capsys.readouterr().out
    assert "4 added, 3 changed, 2 removed, 2 renamed, 233 unchanged; 7 embedded; new version v000002" in out, out[:400]
    assert "  synced     1x, last: 4 added, 3 changed, 2 removed, 2 renamed, 7 embedded" in out  # index info's line
    assert sum(encoded) == 7
    with Index.open(ix) as new:
        sync = new.manifest["syncs"][-1]["counts"]
        assert {k: sync[k] for k in ("added", "changed", "removed", "renamed", "unchanged", "embedded")} == {
            "added": 4, "changed": 3, "removed": 2, "renamed": 2, "unchanged": 233, "embedded": 7}  # fmt: skip
        assert len(new) == N + 4 - 2 == new.faiss().ntotal and new.manifest["builds"][0]["ids"] == [0, N + 1]
        after = by_path(new)
        for was, now in changed["renamed"]:
            assert was not in after
            assert np.array_equal(new.embeddings()[after[now]], old.embeddings()[before[was]])  # not embedded again
            assert new.metadata([after[now]])[0]["sha256"] == old.metadata([before[was]])[0]["sha256"]
        deleted = np.stack([old.embeddings()[before[name]] for name in changed["deleted"]])
        ids, _ = new.search(deleted, k=len(new))  # every item, ranked: none is a deleted file
        assert not {m["filepath"] for m in new.metadata(ids[0])} & set(changed["deleted"])
        assert len(set(ids[0].tolist())) == len(new)
        assert new.metadata([after["0011.png"]])[0]["mtime"] == 10**18 and sync["touched"] == 1  # not embedded
        paths, scores = path_answers(new)

    rebuilt = build_index("clip-tiny", str(images), tmp_path / "rebuilt", batch_size=64, accelerator="cpu")
    with rebuilt:
        expected_paths, expected_scores = path_answers(rebuilt)
    assert paths == expected_paths
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)
    assert path_answers(old)[0][0][0] in before  # the old reader still answers from its version
    old.close()

    encoded.clear()
    main(["index", "sync", str(ix)])  # nothing changed since: no new version, nothing embedded
    assert "already up to date, no new version" in capsys.readouterr().out and not encoded
    assert Index.open(ix).files.name == "v000002"


def test_an_index_built_before_file_records_is_hashed_once(built, tmp_path, capsys):
    images, ix = copy_of(built, tmp_path)
    for db_path in ix.glob("v*/metadata.sqlite"):
        with sqlite3.connect(db_path) as db:
            for column in ("mtime", "size", "sha256"):
                db.execute(f"ALTER TABLE items DROP COLUMN {column}")
    index, report = sync_index(ix)
    assert "items have no mtime / size / sha256" in capsys.readouterr().err
    with index:
        assert report["counts"]["hashed"] == N and report["counts"]["embedded"] == 0 and len(index) == N
        assert index.metadata([0])[0]["sha256"] and index.manifest["syncs"][-1]["unrecorded"] == N
    index, report = sync_index(ix)  # recorded now: nothing to hash
    index.close()
    assert report["version"] is None and report["counts"]["hashed"] == 0


def test_a_file_that_is_no_image_is_skipped_without_a_new_version(built, tmp_path):
    images, ix = copy_of(built, tmp_path)
    (images / "broken.png").write_bytes(b"not a png")
    index, report = sync_index(ix)
    index.close()
    assert report["version"] is None and report["counts"]["skipped"] == 1 and report["counts"]["added"] == 0
    (images / "0004.png").write_bytes(b"not a png either")  # an indexed image broken: it leaves the index
    index, report = sync_index(ix)
    with index:
        assert report["version"] == "v000002" and report["counts"]["skipped"] == 2 and len(index) == N - 1
        assert "0004.png" not in by_path(index)


def test_sync_refuses_an_index_of_a_manifest_or_digits(assets_index, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["index", "sync", str(assets_index.folder)])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmlm index sync: error: ")]
    assert len(lines) == 1 and "read a manifest, shards or digits, not an image folder" in lines[0]


# ------------------------------------------------------------------------------ killed sync, in processes

KILL = """
import json, os, signal, sys, importlib

spec = json.loads(sys.argv[1])
module_name, name = spec["target"].rsplit(".", 1)
module = importlib.import_module(module_name)
original = getattr(module, name)

def killing(*args, **kwargs):
    if spec["match"] and not (args and spec["match"] in str(args[-1])):
        return original(*args, **kwargs)
    if spec["when"] == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

setattr(module, name, killing)
from mmlm.cli import main
main(["index", "sync", spec["index"]])
"""

STEPS = [  # (name, function, before / after its first matching call, text its last argument holds)
    ("while embedding", "mmlm.retrieval.sync.embed", "before", ""),
    ("after the new version's files are written", "mmlm.retrieval.sync.write_version", "after", ""),
    ("right after the pointer swap", "os.replace", "after", "/ix/CURRENT"),
]


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("step, target, when, match", STEPS, ids=[s[0] for s in STEPS])
def test_a_sync_killed_at_a_step_leaves_the_index_whole_and_a_rerun_finishes(
    step, target, when, match, built, tmp_path, capsys
):  # fmt: skip
    images, ix = copy_of(built, tmp_path)
    with Index.open(ix) as server:
        old = path_answers(server)
        change(images)
        spec = {"target": target, "when": when, "match": match, "index": str(ix)}
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", KILL, json.dumps(spec)], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]
        assert path_answers(server)[0] == old[0]  # the reader of the previous version answers the same
        swapped = step == "right after the pointer swap"
        with Index.open(ix) as now:  # the previous version or the new one, whole
            assert len(now) == (N + 2 if swapped else N) and now.faiss().ntotal == len(now)
        main(["index", "sync", str(ix)])
        out = capsys.readouterr().out
        assert ("already up to date" in out) == swapped
        assert path_answers(server)[0] == old[0]
    with Index.open(ix) as done:
        assert len(done) == N + 2 and {"renamed.png", "sub/moved.png", "new/n3.png"} <= set(by_path(done))
        assert not {"0006.png", "0007.png"} & set(by_path(done))
    marker = json.loads((ix / outputs.MARKER).read_text())
    assert marker["files"] == sorted(p.relative_to(ix).as_posix() for p in ix.rglob("*")
                                     if p.is_file() and p.name != outputs.MARKER)  # fmt: skip
    assert not outputs.partial(ix).exists()


def test_renumber_metadata_moves_kept_rows_and_their_captions(tmp_path):
    """The rows a sync keeps move to their new ids inside SQLite, captions with them (caption rows renumbered in
    the new id order, an item's captions in their order), changed columns updated, new rows added, the old file
    untouched: what ``write_metadata`` of the same items would write."""
    from mmlm.retrieval.write import renumber_metadata, write_metadata

    items = [{"meta": {"filepath": f"{i}.png", "year": 2000 + i}, "captions": [f"c{i}a", f"c{i}b"][: i % 3]}
             for i in range(5)]  # fmt: skip
    write_metadata(tmp_path / "old.sqlite", np.arange(5), items, "caption", 0)
    before = (tmp_path / "old.sqlite").read_bytes()
    kept = [(4, 0), (1, 1), (2, 2)]  # 0 and 3 removed; 4 moves ahead of 1
    rows = [(1, {"filepath": "renamed/1.png", "sha256": "ab"}), (3, {"filepath": "new.png", "sha256": "cd"})]
    renumber_metadata(tmp_path / "old.sqlite", tmp_path / "new.sqlite", kept, rows)
    assert (tmp_path / "old.sqlite").read_bytes() == before

    expected = [items[4], {"meta": {**items[1]["meta"], **rows[0][1]}, "captions": items[1]["captions"]}, items[2],
                {"meta": rows[1][1], "captions": []}]  # fmt: skip
    write_metadata(tmp_path / "expected.sqlite", np.arange(4), expected, "caption", 0)

    def dump(path):
        with closing(sqlite3.connect(path)) as db:
            names = sorted(r[1] for r in db.execute("PRAGMA table_info(items)"))
            items = db.execute(f"SELECT {', '.join(names)} FROM items ORDER BY id").fetchall()
            return names, items, db.execute("SELECT row, id, caption FROM texts ORDER BY row").fetchall()

    assert dump(tmp_path / "new.sqlite") == dump(tmp_path / "expected.sqlite")
    assert dump(tmp_path / "new.sqlite")[2] == [(0, 0, "c4a"), (1, 1, "c1a"), (2, 2, "c2a"), (3, 2, "c2b")]
