"""`mmlm index build` never deletes or mixes what it does not own: `--overwrite` replaces only an index,
two builds of one folder exclude each other (one of them a real second process), SIGTERM stops a build
keeping its chunks, and `--resume` continues it."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
from _checks import error_line, hashes
from test_index_processes import mmlm_index

from mmlm import outputs
from mmlm.cli import main
from mmlm.paths import ASSETS
from mmlm.retrieval import Index

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = ["--batch_size", "4", "--chunk_size", "8", "--accelerator", "cpu"]


def build_in_background(tmp_path: Path) -> tuple[Path, object]:
    """``mmlm index build`` of the 360 test digits into ``tmp_path/ix`` in a second process, once it has
    written its first chunk: (the index folder, the process)."""
    out = tmp_path / "ix"
    proc = mmlm_index("build", "clip-tiny", "digits", "--out", str(out), *OPTIONS, cwd=tmp_path)
    wait_for_chunk(proc, out)
    return out, proc


def wait_for_chunk(proc, out: Path) -> None:
    chunks = outputs.partial(out) / "chunks"
    deadline = time.monotonic() + 300
    while not list(chunks.glob("*.npz")):
        assert proc.poll() is None, f"the build ended before writing a chunk:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ------------------------------------------------------------------------------ --overwrite


def test_overwrite_refuses_the_photo_folder_itself_and_a_documents_folder(tmp_path, capsys):
    """The issue's reproduction: `--out PHOTOS --overwrite` deleted 21 JPEGs and a diary, `--out ~/docs` a thesis."""
    photos = tmp_path / "photos"
    shutil.copytree(ASSETS / "images", photos)
    (photos / "diary.txt").write_text("dear diary")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("\\documentclass{article}")
    before = hashes(tmp_path)
    assert len(before) == 23
    line = error_line(capsys, "index", "build", "clip-tiny", str(photos), "--out", str(photos), "--overwrite")
    assert line.startswith(f"mmlm index build: error: {photos} already exists and holds files mmlm did not write")
    line = error_line(capsys, "index", "build", "clip-tiny", "assets", "--out", str(docs), "--overwrite")
    assert f"{docs} already exists and holds files mmlm did not write" in line
    assert hashes(tmp_path) == before  # every file byte-identical, nothing added beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "photos"]


def test_overwrite_refuses_another_kind_of_mmlm_output_and_a_file_added_to_an_index(assets_index, tmp_path, capsys):
    import mmlm
    from mmlm.export import export

    hf = export(mmlm.create_model("clip-tiny"), tmp_path / "hf", "hf")
    before = hashes(hf)
    line = error_line(capsys, "index", "build", "clip-tiny", "assets", "--out", str(hf), "--overwrite")
    assert f"{hf} already exists and is a transformers folder, not an mmlm index" in line
    assert hashes(hf) == before
    ix = tmp_path / "ix"
    shutil.copytree(assets_index.folder, ix)
    (ix / "notes.txt").write_text("mine")
    line = error_line(capsys, "index", "build", "clip-tiny", "assets", "--out", str(ix), "--overwrite")
    assert f"{ix} already exists and holds notes.txt, which mmlm did not write" in line
    assert (ix / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_an_index_and_an_empty_folder_is_written(assets_index, tmp_path, capsys):
    ix = tmp_path / "ix"
    shutil.copytree(assets_index.folder, ix)
    with Index.open(ix) as server:  # a server on the index being replaced
        main(["index", "build", "clip-tiny", str(ASSETS / "images"), "--out", str(ix), "--overwrite", *OPTIONS])
        assert server.metadata([0]) == assets_index.metadata([0]) and len(server.text_ids) == 49  # still answers
    with Index.open(ix) as index:
        assert len(index) == 21 and index.manifest["counts"]["texts"] == 0  # the folder's, no captions
        assert index.files == ix / "v000002" and (ix / "v000001" / "manifest.json").is_file()  # swapped in beside
    assert outputs.kind_of(ix) == "index" and outputs.foreign_file(ix) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    main(["index", "build", "clip-tiny", "assets", "--out", str(empty), *OPTIONS])
    assert len(Index.open(empty)) == 21
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ix"]  # no .partial, no .old left


# ------------------------------------------------------------------------------ one writer at a time


@pytest.mark.slow
@pytest.mark.processes
def test_a_second_build_is_refused_while_the_first_runs(tmp_path, capsys):
    """The issue's reproduction: a second build wiped the first's `.DIR.partial` and published both data sets."""
    out, first = build_in_background(tmp_path)
    first.send_signal(signal.SIGSTOP)  # still running (and holding the lock) however fast this machine is
    try:
        line = error_line(capsys, "index", "build", "clip-tiny", "assets", "--out", str(out), *OPTIONS)
    finally:
        first.send_signal(signal.SIGCONT)
    assert f"{out} is being written by another mmlm command (pid {first.pid})" in line
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log[-3000:]
    index = Index.open(out)
    assert len(index) == 360 and index.manifest["builds"][0]["data"] == "digits"  # the 360 test digits, alone


def test_add_and_build_take_the_same_lock(assets_index, tmp_path, capsys):
    ix = tmp_path / "ix"
    shutil.copytree(assets_index.folder, ix)
    with outputs.claim(ix):  # as a running build holds it
        line = error_line(capsys, "index", "add", str(ix), str(ASSETS / "images"), *OPTIONS)
        assert line.startswith(f"mmlm index add: error: {ix} is being written by another mmlm command")
        line = error_line(capsys, "index", "build", "clip-tiny", "assets", "--out", str(ix), "--overwrite", *OPTIONS)
        assert f"{ix} is being written by another mmlm command" in line
    assert Index.open(ix).manifest == assets_index.manifest


# ------------------------------------------------------------------------------ signals


@pytest.mark.slow
@pytest.mark.processes
def test_sigterm_stops_a_build_keeping_its_chunks_and_resume_completes_it(tmp_path, capsys):
    out, proc = build_in_background(tmp_path)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "mmlm index build: stopped by SIGTERM:" in log and "rerun with --resume" in log
    chunks = sorted((outputs.partial(out) / "chunks").glob("*.npz"))
    assert 1 <= len(chunks) < 360 // 8 and not out.exists()
    main(["index", "build", "clip-tiny", "digits", "--out", str(out), *OPTIONS, "--resume"])
    assert f"resuming from {len(chunks)} chunks" in capsys.readouterr().err
    assert len(Index.open(out)) == 360 and not outputs.partial(out).exists()
