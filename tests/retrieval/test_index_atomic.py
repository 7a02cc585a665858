"""`mmlm index add` swaps a new version in atomically: DIR is never absent or half written, an Index opened
on the old version (a running server) keeps answering the same, and an add killed (SIGKILL) at any step
leaves the old or the new index, complete, which `--resume` (or a fresh add) then finishes."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmlm import outputs
from mmlm.cli import main
from mmlm.paths import ASSETS
from mmlm.retrieval import Index, add_to_index, versions
from mmlm.retrieval.index import CURRENT, files_of

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ["--batch_size", "4", "--chunk_size", "2", "--accelerator", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def answers(index: Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of one fixed set of queries (seeded random directions) against images and captions."""
    queries = np.random.default_rng(0).standard_normal((6, index.dim)).astype(np.float32)
    out = [index.search(queries, k=8, modality=m) for m in ("image", "text")]
    return np.concatenate([o[0] for o in out], 1), np.concatenate([o[1] for o in out], 1)


def assert_same_answers(index: Index, expected: tuple[np.ndarray, np.ndarray]) -> None:
    ids, scores = answers(index)
    assert np.array_equal(ids, expected[0])
    np.testing.assert_allclose(scores, expected[1], rtol=0, atol=1e-6)


def assert_whole(ix: Path) -> None:
    """mmlm's own index: every file listed in the marker, nothing half written, no work folder left."""
    assert outputs.kind_of(ix) == "index" and outputs.foreign_file(ix) is None
    marker = json.loads((ix / outputs.MARKER).read_text())
    on_disk = sorted(p.relative_to(ix).as_posix() for p in ix.rglob("*") if p.is_file() and p.name != outputs.MARKER)
    assert marker["files"] == on_disk


def stage(version: Path, ix: Path) -> Path:
    """A copy of ``version`` in ``.ix.partial/index``, as a finished job leaves it."""
    staged = outputs.partial(ix) / "index"
    shutil.copytree(version, staged)
    return staged


def swap(version: Path, ix: Path) -> str:
    """``version`` (a copy) made the index in ``ix`` under its lock, as ``index add`` does after its merge."""
    with outputs.claim(ix) as root:
        name = versions.publish(stage(version, ix), ix, root, overwrite=True)
    shutil.rmtree(outputs.partial(ix))
    return name


# ------------------------------------------------------------------------------ in one process (quick)


def test_a_swap_leaves_the_old_reader_answering_and_keeps_one_previous_version(assets_index, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(assets_index.folder, ix)
    assert (ix / CURRENT).read_text().strip() == "v000001" and assets_index.files == assets_index.folder / "v000001"
    expected = answers(assets_index)
    with Index.open(ix) as server:  # a server holding version 1
        assert swap(assets_index.files, ix) == "v000002"
        assert files_of(ix) == ix / "v000002" and (ix / "v000001" / "manifest.json").is_file()  # previous kept
        assert_whole(ix)
        assert swap(assets_index.files, ix) == "v000003"
        assert sorted(p.name for p in ix.iterdir()) == [outputs.MARKER, CURRENT, "v000002", "v000003"]
        assert_same_answers(server, expected)  # its version's files are gone; its maps and SQLite file are not
        assert server.metadata([0, 20]) == assets_index.metadata([0, 20])
        assert_whole(ix)
    with Index.open(ix) as new:
        assert new.files == ix / "v000003" and len(new) == 21
        assert_same_answers(new, expected)
    (ix / "v000003" / "notes.txt").write_text("mine")  # a user's file, even inside a version, stops every write
    with pytest.raises(FileExistsError, match="holds v000003/notes.txt, which mmlm did not write"):
        outputs.check(ix, "index", overwrite=True)


def test_a_flat_index_gets_its_first_version_and_its_old_reader_keeps_answering(assets_index, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(assets_index.files, ix)  # the layout before versions: files in DIR, no marker
    assert outputs.kind_of(ix) == "index" and not (ix / CURRENT).exists()
    expected = answers(assets_index)
    with Index.open(ix) as server:
        assert server.files == ix
        assert swap(assets_index.files, ix) == "v000001"
        assert sorted(p.name for p in ix.iterdir()) == [outputs.MARKER, CURRENT, "v000001"]  # flat files removed
        assert_same_answers(server, expected)
        assert_whole(ix)
    with Index.open(ix) as new:
        assert new.files == ix / "v000001"
        assert_same_answers(new, expected)


def test_tidy_removes_what_a_killed_swap_left_and_nothing_else(assets_index, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(assets_index.folder, ix)
    swap(assets_index.files, ix)
    swap(assets_index.files, ix)  # v000002 (previous), v000003 (current)
    shutil.copytree(ix / "v000003", ix / "v000004")  # renamed in, but CURRENT never named it
    shutil.copytree(ix / "v000003", ix / "v000001")  # older than the previous: half removed
    (ix / "v000001" / "manifest.json").unlink()
    outputs.mark(ix, "index")  # the marker listed them, as the killed swap had written it
    versions.tidy(ix)
    assert sorted(p.name for p in ix.iterdir()) == [outputs.MARKER, CURRENT, "v000002", "v000003"]
    assert_whole(ix)


def test_index_is_a_context_manager_and_close_is_idempotent(assets_index):
    with Index.open(assets_index.folder) as index:
        assert len(index) == 21
    assert index.closed
    index.close()  # a second close does nothing
    assert index.closed


def test_imports_between_retrieval_modules_point_down():
    """No module of mmlm/retrieval imports one that imports it back, lazily (inside a function) or not."""
    folder = ROOT / "mmlm" / "retrieval"
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmlm.retrieval"):
                found.add(node.module.removeprefix("mmlm.retrieval").lstrip(".") or "__init__")
                if node.module == "mmlm.retrieval":  # from mmlm.retrieval import versions: a module
                    found |= {a.name for a in node.names if (folder / f"{a.name}.py").exists()}
        graph[path.stem] = found - {"__init__", path.stem}
    assert "build" not in graph["index"] and graph["index"] <= {"options", "choose"}
    assert graph["choose"] == set()  # the choice of a FAISS index: a leaf, below the Index that searches it

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [m for m in graph if m in reach(m)] == []


# ------------------------------------------------------------------------------ killed add, in processes

KILL = """
import json, os, signal, sys, importlib

spec = json.loads(sys.argv[1])
module_name, name = spec["target"].rsplit(".", 1)
module = importlib.import_module(module_name)
original = getattr(module, name)
calls = 0

def killing(*args, **kwargs):
    global calls
    if spec["match"] and not (args and spec["match"] in str(args[-1])):
        return original(*args, **kwargs)
    calls += 1
    if calls == spec["nth"] and spec["when"] == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls == spec["nth"] and spec["when"] == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(module, name, killing)
from mmlm.cli import main
main(["index", "add", *spec["args"]])
"""

# (name, function, before / after its call, its Nth matching call, text its last argument holds, flat layout)
STEPS = [
    ("after the chunks, at the merge", "mmlm.retrieval.build.merge", "before", 1, "", False),
    ("after the new version's files are written", "mmlm.retrieval.build.write_index", "after", 1, "", False),
    ("before the fsync", "mmlm.retrieval.versions.fsync_tree", "before", 1, "", False),
    ("during the fsync", "os.fsync", "before", 3, "", False),
    ("marker updated, version not moved in", "os.rename", "before", 1, "/ix/v000003", False),
    ("version moved in, before the pointer", "os.rename", "after", 1, "/ix/v000003", False),
    ("right before the pointer swap", "os.replace", "before", 1, "/ix/CURRENT", False),
    ("right after the pointer swap", "os.replace", "after", 1, "/ix/CURRENT", False),
    ("during the removal of old versions", "os.unlink", "before", 2, "/ix/v000001/", False),
    ("before the last marker", "os.replace", "before", 3, "/ix/.mmlm-output.json", False),  # 1: tidy, 2: adding
    ("flat: right before the pointer swap", "os.replace", "before", 1, "/ix/CURRENT", True),
    ("flat: right after the pointer swap", "os.replace", "after", 1, "/ix/CURRENT", True),
    ("flat: during the removal of the flat files", "os.unlink", "before", 2, "/ix/", True),
]
SWAPPED = {"right after the pointer swap", "during the removal of old versions", "before the last marker",
           "flat: right after the pointer swap", "flat: during the removal of the flat files"}  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three photographs (absolute paths) with a caption each: the data every add appends."""
    rows = [(ASSETS / "images" / n, f"a photo of {n[:-4]}") for n in ("coffee.jpg", "chelsea.jpg", "rocket.jpg")]
    path = tmp_path_factory.mktemp("photos") / "photos.csv"
    path.write_text("filepath,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return path


def base_index(assets_index, folder: Path, flat: bool) -> Path:
    """The index an add extends: two versions (v000001 previous, v000002 current), or the flat layout."""
    ix = folder / "ix"
    if flat:
        shutil.copytree(assets_index.files, ix)
    else:
        shutil.copytree(assets_index.folder, ix)
        swap(assets_index.files, ix)
    return ix


@pytest.fixture(scope="module")
def reference(assets_index, photos, tmp_path_factory) -> tuple[int, tuple[np.ndarray, np.ndarray]]:
    """An uninterrupted add: its length and answers."""
    ix = base_index(assets_index, tmp_path_factory.mktemp("reference"), flat=False)
    index = add_to_index(ix, str(photos), batch_size=4, chunk_size=2, accelerator="cpu")
    assert index is not None and len(index) == 24 and len(index.text_ids) == 49 + 3
    with index:
        return len(index), answers(index)


def killed_add(ix: Path, photos: Path, target: str, when: str, nth: int, match: str) -> str:
    spec = {"target": target, "when": when, "nth": nth, "match": match, "args": [str(ix), str(photos), *OPTIONS]}
    env = {k: v for k, v in os.environ.items() if k != "MMLM_DEBUG"}
    env |= {"PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL, json.dumps(spec)], cwd=ix.parent, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]  # killed at that step, not before or after
    return proc.stdout


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize("step, target, when, nth, match, flat", STEPS, ids=[s[0] for s in STEPS])
def test_an_add_killed_at_any_step_leaves_a_whole_index_and_resume_finishes_it(
    step, target, when, nth, match, flat, assets_index, photos, reference, tmp_path, capsys
):  # fmt: skip
    ix = base_index(assets_index, tmp_path, flat)
    old = answers(assets_index)
    n_new, new = reference
    with Index.open(ix) as server:  # a running server, on the version current before the add
        killed_add(ix, photos, target, when, nth, match)
        assert_same_answers(server, old)
        swapped = step in SWAPPED
        with Index.open(ix) as now:  # the old index or the new one, whole
            assert len(now) == (n_new if swapped else 21) and now.faiss("image").ntotal == len(now)
            assert now.metadata([len(now) - 1])[0] is not None and now.metadata([len(now)]) == [None]
            assert_same_answers(now, new if swapped else old)
        assert outputs.kind_of(ix) == "index" and outputs.foreign_file(ix) is None  # a later add is not refused

        # one case starts over (a fresh add), every other continues (--resume)
        fresh = step == "version moved in, before the pointer"
        main(["index", "add", str(ix), str(photos), *OPTIONS, *([] if fresh else ["--resume"])])
        err = capsys.readouterr().err
        assert ("already made the new version current" in err) == swapped
        assert_same_answers(server, old)
    with Index.open(ix) as done:
        assert len(done) == n_new and len(done.manifest["builds"]) == 2
        assert_same_answers(done, new)
        kept = sorted(p.name for p in ix.iterdir() if p.is_dir())
        assert done.files.name == kept[-1] and len(kept) == (1 if flat else 2)  # the current and its previous
    assert_whole(ix)
    assert not outputs.partial(ix).exists()
