"""`mmlm index build` as separate processes: killed with SIGKILL and resumed, and embedding on 2 gloo ranks.
Each is compared with an uninterrupted, one-process build of the same data in this process."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmlm.cli import main
from mmlm.paths import ASSETS
from mmlm.retrieval import Index, build_index

ROOT = Path(__file__).resolve().parents[2]


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.processes, pytest.mark.slow]


def mmlm_index(*args: str, cwd: Path) -> subprocess.Popen:
    quiet = {"PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # see conftest.py one_thread
    env = {k: v for k, v in os.environ.items() if k != "MMLM_DEBUG"} | quiet
    return subprocess.Popen([sys.executable, "-m", "mmlm.cli", "index", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def kill_after_first_chunk(proc: subprocess.Popen, out: Path) -> list[Path]:
    """SIGKILL the build as soon as one chunk file exists; the chunks it left."""
    chunks = out.parent / f".{out.name}.partial" / "chunks"
    deadline = time.monotonic() + 300
    while not list(chunks.glob("*.npz")):
        assert proc.poll() is None, f"the build ended before writing a chunk:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return sorted(chunks.glob("*.npz"))


def assert_same_index(a: Index, b: Index, atol: float = 1e-6) -> None:
    assert a.manifest["counts"] == b.manifest["counts"] and a.manifest["skipped"] == b.manifest["skipped"]
    n = len(a)
    assert a.metadata(range(n)) == b.metadata(range(n))
    np.testing.assert_array_equal(a.text_ids, b.text_ids)
    for modality in ("image", "text"):
        np.testing.assert_allclose(a.embeddings(modality), b.embeddings(modality), rtol=0, atol=atol)
        ids_a, scores_a = a.search(a.embeddings("image"), k=5, modality=modality)
        ids_b, scores_b = b.search(a.embeddings("image"), k=5, modality=modality)
        assert np.array_equal(ids_a, ids_b)
        np.testing.assert_allclose(scores_a, scores_b, atol=1e-5)


OPTIONS = ["--split", "train", "--batch_size", "4", "--chunk_size", "8", "--accelerator", "cpu"]


def test_sigkill_then_resume_gives_the_uninterrupted_index(tmp_path, capsys):
    out = tmp_path / "ix"
    proc = mmlm_index("build", "clip-tiny", "digits", "--out", str(out), *OPTIONS, cwd=tmp_path)
    chunks = kill_after_first_chunk(proc, out)
    assert not out.exists()  # killed mid-build: no DIR at all
    assert 1 <= len(chunks) < 1437 // 8  # 1,437 training digits in chunks of 8: killed part-way
    main(["index", "build", "clip-tiny", "digits", "--out", str(out), *OPTIONS, "--resume"])
    assert f"resuming from {len(chunks)} chunks" in capsys.readouterr().err
    main(["index", "build", "clip-tiny", "digits", "--out", str(tmp_path / "whole"), *OPTIONS])
    resumed, whole = Index.open(out), Index.open(tmp_path / "whole")
    assert len(resumed) == 1437 and resumed.faiss("image").ntotal == 1437
    assert_same_index(resumed, whole)
    assert not (tmp_path / ".ix.partial").exists()


def test_killed_overwrite_leaves_the_previous_index(assets_index, tmp_path):
    out = tmp_path / "ix"
    shutil.copytree(assets_index.folder, out)
    before = Index.open(out)
    proc = mmlm_index("build", "clip-tiny", "digits", "--out", str(out), "--overwrite", *OPTIONS, cwd=tmp_path)
    kill_after_first_chunk(proc, out)
    after = Index.open(out)
    assert after.manifest == before.manifest
    assert_same_index(after, before, atol=0)


@pytest.fixture
def photos_and_bad_rows(tmp_path) -> Path:
    """The bundled photographs (absolute paths) with their captions, and three bad rows."""
    with open(ASSETS / "captions.csv", newline="") as f:
        rows = [(str(ASSETS / r["filepath"]), r["title"]) for r in csv.DictReader(f)]
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows += [(str(tmp_path / "missing.jpg"), "gone"), (str(tmp_path / "empty.jpg"), "empty"),
             (str(ASSETS / "images" / "rocket.jpg"), " ")]  # fmt: skip
    with open(tmp_path / "photos.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *rows])
    return tmp_path / "photos.csv"


def test_two_processes_give_what_one_gives(photos_and_bad_rows, tmp_path):
    args = [str(photos_and_bad_rows), "--batch_size", "4", "--chunk_size", "4", "--accelerator", "cpu"]
    proc = mmlm_index("build", "clip-tiny", *args, "--out", str(tmp_path / "two"), "--devices", "2", cwd=tmp_path)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    assert "MEMBER: 2/2" in log  # Lightning started two gloo ranks
    one = build_index("clip-tiny", str(photos_and_bad_rows), tmp_path / "one", batch_size=4, accelerator="cpu")
    two = Index.open(tmp_path / "two")
    assert two.manifest["skipped"] == {"empty_file": 1, "empty_text": 1, "missing_file": 1}
    assert len(two) == 21 and len(two.text_ids) == 49
    assert_same_index(two, one)


def test_a_rank_with_nothing_to_embed(tmp_path):
    """One image, two ranks: rank 1's share is empty, and both still meet at the merge."""
    (tmp_path / "one.csv").write_text(f"filepath,caption\n{ASSETS / 'images' / 'rocket.jpg'},a rocket\n")
    proc = mmlm_index("build", "clip-tiny", str(tmp_path / "one.csv"), "--out", str(tmp_path / "ix"), "--devices", "2",
                      "--accelerator", "cpu", cwd=tmp_path)  # fmt: skip
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    index = Index.open(tmp_path / "ix")
    assert len(index) == 1 and index.metadata([0])[0]["captions"] == ["a rocket"]
