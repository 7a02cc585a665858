"""mmlm.outputs, the one rule of every writer: a folder is written only if new, empty, or (with overwrite)
an mmlm output of the same kind holding nothing else; a file only if new, or with overwrite; one writer
at a time, and a killed writer's lock does not outlive it. Then the commands that write files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _checks import error_line, hashes

import mmlm
from mmlm import outputs
from mmlm.cli import main
from mmlm.paths import ASSETS

ROOT = Path(__file__).resolve().parents[1]


def write_two(folder: Path, text: str) -> None:
    (folder / "a.txt").write_text(text)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(text)


# ------------------------------------------------------------------------------ folders


def test_a_new_or_empty_folder_is_written_and_marked(tmp_path):
    with outputs.writing(tmp_path / "new", "tokenizer") as folder:
        write_two(folder, "one")
    (tmp_path / "empty").mkdir()
    with outputs.writing(tmp_path / "empty", "tokenizer") as folder:
        write_two(folder, "one")
    for name in ("new", "empty"):
        assert outputs.kind_of(tmp_path / name) == "tokenizer" and outputs.foreign_file(tmp_path / name) is None
        assert hashes(tmp_path / name).keys() == {".mmlm-output.json", "a.txt", "sub/b.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no .partial left


def test_overwrite_replaces_an_output_of_the_same_kind_as_a_whole(tmp_path):
    out = tmp_path / "out"
    with outputs.writing(out, "tokenizer") as folder:
        write_two(folder, "one")
    with pytest.raises(FileExistsError, match=f"{out} already exists \\(a tokenizer folder\\).*--overwrite"):
        outputs.check(out, "tokenizer")
    with outputs.writing(out, "tokenizer", overwrite=True) as folder:
        (folder / "c.txt").write_text("two")
    assert sorted(hashes(out)) == [".mmlm-output.json", "c.txt"]  # the old files went with the old output


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_mmlm_did_not_write_is_never_touched(tmp_path, overwrite):
    mine = tmp_path / "mine"
    mine.mkdir()
    write_two(mine, "the user's")
    before = hashes(tmp_path)
    with pytest.raises(FileExistsError, match=f"{mine} already exists and holds files mmlm did not write"):
        with outputs.writing(mine, "mmlm", overwrite):
            pytest.fail("the block ran")
    assert hashes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_another_kind_and_a_foreign_file_are_refused(tmp_path):
    out = tmp_path / "out"
    with outputs.writing(out, "hf") as folder:
        write_two(folder, "one")
    with pytest.raises(FileExistsError, match=f"{out} already exists and is a transformers folder, not a tokenizer"):
        outputs.check(out, "tokenizer", overwrite=True)
    (out / "sub" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds sub/notes.txt, which mmlm did not write"):
        outputs.check(out, "hf", overwrite=True)
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        outputs.check(out / "a.txt", "hf", overwrite=True)


def test_an_error_while_writing_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with outputs.writing(out, "mmlm") as folder:
        write_two(folder, "one")
    before = hashes(out)
    with pytest.raises(RuntimeError, match="cut short"):
        with outputs.writing(out, "mmlm", overwrite=True) as folder:
            (folder / "a.txt").write_text("half")
            raise RuntimeError("cut short")
    assert hashes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_indexes_and_models_written_before_markers_are_recognised_by_their_own_files(tmp_path):
    ix = tmp_path / "ix"
    ix.mkdir()
    (ix / "manifest.json").write_text('{"format": "mmlm-index/1"}')
    (ix / "image_embeds.npy").write_bytes(b"")
    assert outputs.kind_of(ix) == "index" and outputs.foreign_file(ix) is None
    outputs.check(ix, "index", overwrite=True)
    (ix / "diary.txt").write_text("mine")
    assert outputs.foreign_file(ix) == "diary.txt"
    model = tmp_path / "model"
    mmlm.save(mmlm.create_model("vit-tiny"), model)
    (model / ".mmlm-output.json").unlink()
    assert outputs.kind_of(model) == "mmlm" and outputs.foreign_file(model) is None


# ------------------------------------------------------------------------------ the lock


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with outputs.claim(out):
        held = f"{out} is being written by another mmlm command \\(pid {os.getpid()}\\)"
        with pytest.raises(FileExistsError, match=held):
            with outputs.writing(out, "mmlm"):
                pytest.fail("the block ran")
    with outputs.writing(out, "mmlm") as folder:  # free again
        (folder / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"


def test_the_lock_of_a_killed_writer_does_not_outlive_it(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from mmlm import outputs\n"
            "with outputs.claim(sys.argv[1]):\n print('held', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(FileExistsError, match=f"pid {proc.pid}"):
        with outputs.claim(out):
            pytest.fail("claimed a held lock")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (outputs.partial(out) / ".lock").exists()  # the stale lock file is still there...
    with outputs.writing(out, "mmlm") as folder:  # ...and blocks nothing
        (folder / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one" and not outputs.partial(out).exists()


# ------------------------------------------------------------------------------ files


def test_a_file_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "result.json"
    outputs.write_file(path, "one")
    with pytest.raises(FileExistsError, match=f"{path} already exists: give a new file name, or pass --overwrite"):
        outputs.write_file(path, "two")
    assert path.read_text() == "one"
    outputs.write_file(path, b"three", overwrite=True)
    assert path.read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with pytest.raises(IsADirectoryError, match="is a folder"):
        outputs.write_file(tmp_path, "x", overwrite=True)


def test_explain_refuses_an_existing_out_file_before_loading_the_model(tmp_path, capsys):
    heat = tmp_path / "existing.png"
    heat.write_bytes(b"the user's picture")
    image = str(ASSETS / "images" / "chelsea.jpg")
    line = error_line(capsys, "explain", "clip-tiny", image, "a cat", "--out", str(heat))
    assert line == (f"mmlm explain: error: {heat} already exists: give a new file name, or pass --overwrite to "
                    "replace it (add --debug for the traceback)")  # fmt: skip
    assert heat.read_bytes() == b"the user's picture"
    main(["explain", "clip-tiny", image, "a cat", "--out", str(heat), "--overwrite", "--method", "similarity"])
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zeroshot_refuses_existing_output_files_before_loading_the_model(tmp_path, capsys):
    result, matrix = tmp_path / "zs.json", tmp_path / "zs.png"
    matrix.write_text("mine")
    line = error_line(capsys, "zeroshot", "clip-tiny", "--output", str(result), "--confusion_matrix", str(matrix))
    assert f"{matrix} already exists" in line and "--overwrite" in line
    assert matrix.read_text() == "mine" and not result.exists()


def test_tokenizer_train_refuses_an_exported_folder_and_keeps_its_files(tmp_path, capsys):
    """The issue's reproduction: `tokenizer train --out` replaced an export's tokenizer_config.json."""
    from mmlm.data.tokenizers import get_tokenizer
    from mmlm.export import export

    tok = get_tokenizer(str(ASSETS / "tokenizer"), context_length=32)
    text = mmlm.config.from_name("bert-tiny", vocab_size=tok.vocab_size, context_length=32)
    hf = export(mmlm.create_model(text), tmp_path / "hf", "hf", tokenizer=tok)
    assert (hf / "tokenizer_config.json").is_file()
    before = hashes(hf)
    corpus = str(ASSETS / "corpus.txt")
    for extra in ([], ["--overwrite"]):
        line = error_line(capsys, "tokenizer", "train", corpus, "--vocab_size", "200", "--out", str(hf), *extra)
        assert f"{hf} already exists and is a transformers folder, not a tokenizer folder" in line
    assert hashes(hf) == before
    main(["tokenizer", "train", corpus, "--vocab_size", "200", "--out", str(tmp_path / "tok")])
    main(["tokenizer", "train", corpus, "--vocab_size", "300", "--out", str(tmp_path / "tok"), "--overwrite"])
    assert get_tokenizer(str(tmp_path / "tok")).vocab_size == 300


def test_tokenizer_save_never_replaces_a_file_silently(tmp_path):
    from mmlm.data.tokenizers import get_tokenizer

    tok = get_tokenizer(str(ASSETS / "tokenizer"))
    (tmp_path / "tokenizer_config.json").write_text("mine")
    with pytest.raises(FileExistsError, match="tokenizer_config.json already exists"):
        tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer_config.json"]  # all refused before one written
    tok.save(tmp_path, overwrite=True)
    assert get_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size
