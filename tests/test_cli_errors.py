"""`mmlm` as people type it: a fast --help that lists every command, dashes in options, and for every
mistake one line on stderr naming the bad value, exit code 2, no traceback (unless --debug / MMLM_DEBUG=1).

The real command runs in a subprocess for one case of each command; the variants of a case go through
``mmlm.cli.main`` in this process (the same entry point, without paying the imports again).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning  # noqa: F401 (its log handlers keep the stderr of their import: not a test's capsys, closed after it)
import pytest
import torch

import mmlm
from mmlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "align" / "clip-digits-tiny.yaml"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("MMLM_DEBUG", raising=False)


def run_mmlm(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MMLM_DEBUG"} | {"PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mmlm.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def error_line(stderr: str, command: str) -> str:
    """The one line ``mmlm COMMAND: error: ...``; other stderr lines are progress bars and logs."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"mmlm {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def fails_in_process(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    return error_line(capsys.readouterr().err, args[0])


# ------------------------------------------------------------------------------ help and typing


def test_help_lists_every_command_without_importing_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mmlm.cli", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0
    for command in ("fit", "validate", "test", "predict", "convert", "demo", "presets", "tokenizer", "zeroshot",
                    "eval-retrieval", "clip-benchmark", "index", "quantize", "prune", "explain", "serve", "search"):  # fmt: skip
        assert f"\n    {command} " in done.stdout, command
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    heavy = {"torch", "lightning", "transformers", "timm", "open_clip", "faiss", "fastapi", "captum"} & imported
    assert not heavy, f"--help imported {heavy}"


def test_package_names_import_lazily():
    code = "import sys, mmlm; assert 'torch' not in sys.modules, 'import mmlm imported torch'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    public = ["CLIP", "CLIPConfig", "TextConfig", "TextEncoder", "TextWithHeads", "VisionConfig", "VisionTransformer",
              "create_model", "export_hf_clip", "from_name", "get_tokenizer", "list_presets", "load",
              "load_pretrained", "resolve", "save"]  # fmt: skip
    assert sorted(mmlm.__all__) == public
    assert all(callable(getattr(mmlm, name)) for name in public)
    from mmlm import CLIP, create_model

    assert isinstance(create_model("clip-tiny"), CLIP)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmlm.nope  # noqa: B018


def test_fit_help_still_works(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    assert "--trainer.max_steps" in capsys.readouterr().out


def test_options_take_dashes(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("some words for a tokenizer\n" * 50)
    main(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "40", "--out", str(tmp_path / "t")])
    assert "wordpiece tokenizer with" in capsys.readouterr().out
    assert mmlm.get_tokenizer(tmp_path / "t").vocab_size <= 40
    # a misspelt option is still refused by the parser, in its own words
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-sise", "40"])
    assert exit_.value.code == 2 and "--vocab_sise" in capsys.readouterr().err


# ------------------------------------------------------------------------------ models that do not exist


@pytest.mark.slow
def test_unknown_preset_in_fit_is_one_line_before_training(tmp_path):
    done = run_mmlm("fit", "--config", str(DIGITS), "--model.init_args.model", "clip-tinyy",
                    "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 2
    line = error_line(done.stderr, "fit")
    assert "unknown preset 'clip-tinyy'" in line and "did you mean 'clip-tiny'" in line and "vit-b-16" in line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_lightning_options_take_dashes_too(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = fails_in_process(capsys, "fit", "--config", str(DIGITS), "--model.init-args.model", "clip-tinyy",
                            "--trainer.default-root-dir", str(tmp_path))  # fmt: skip
    assert "unknown preset 'clip-tinyy'" in line
    assert not list(tmp_path.iterdir())


def test_unknown_share_mode_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = fails_in_process(capsys, "fit", "--config", str(DIGITS), "--model.init_args.model_overrides",
                            "{share: everything}", "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert "share='everything'" in line and "none, attention, attention_mlp, all" in line


# ------------------------------------------------------------------------------ broken files


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return mmlm.save(mmlm.create_model("clip-tiny"), tmp_path_factory.mktemp("ckpt") / "clip")


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory) -> bytes:
    """The bytes of a real ``torch.save`` zip archive."""
    path = tmp_path_factory.mktemp("pt") / "w.pt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    return path.read_bytes()


def broken(kind: str, whole: bytes) -> bytes:
    return {"empty": b"", "random": os.urandom(3000), "truncated": whole[: len(whole) // 2]}[kind]


@pytest.mark.slow
def test_broken_safetensors_through_the_real_command(tmp_path, clip_folder):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((clip_folder / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(b"")
    done = run_mmlm("convert", str(folder), str(tmp_path / "out"))
    assert done.returncode == 2
    line = error_line(done.stderr, "convert")
    assert f"{folder / 'model.safetensors'} is not a valid or complete safetensors file" in line


def test_debug_raises_the_error_itself(tmp_path, monkeypatch):
    """--debug (anywhere on the line) or MMLM_DEBUG=1: the exception propagates, so Python prints its traceback."""
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        main(["convert", missing, str(tmp_path / "out"), "--debug"])
    monkeypatch.setenv("MMLM_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        main(["convert", missing, str(tmp_path / "out")])


def test_missing_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(missing), str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert f"mmlm convert: error: no checkpoint file or folder '{missing}'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty", "random", "truncated"])
def test_broken_safetensors(kind, tmp_path, clip_folder, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((clip_folder / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(broken(kind, (clip_folder / "model.safetensors").read_bytes()))
    line = fails_in_process(capsys, "convert", str(folder), str(tmp_path / "out"))
    assert f"{folder / 'model.safetensors'} is not a valid or complete safetensors file" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["empty", "random", "truncated"])
def test_broken_lightning_checkpoint(kind, tmp_path, torch_file, capsys):
    path = tmp_path / "last.ckpt"
    path.write_bytes(broken(kind, torch_file))
    line = fails_in_process(capsys, "convert", str(path), str(tmp_path / "out"))
    assert f"{path} is not a valid or complete PyTorch checkpoint" in line


@pytest.mark.slow
def test_text_file_named_pt_through_the_real_command(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("this is not a checkpoint\n")
    done = run_mmlm("zeroshot", str(path), "--dataset", "digits")
    assert done.returncode == 2
    assert f"{path} is not a valid or complete PyTorch checkpoint" in error_line(done.stderr, "zeroshot")


def test_config_json_that_is_not_json(tmp_path, clip_folder, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((clip_folder / "model.safetensors").read_bytes())
    (folder / "config.json").write_text('{"format": "mmlm",\n "config": ')
    line = fails_in_process(capsys, "eval-retrieval", str(folder), "--dataset", "digits")
    assert f"{folder / 'config.json'} is not valid JSON" in line and "line 2 column" in line


# ------------------------------------------------------------------------------ numbers out of range


@pytest.mark.slow
def test_recall_at_zero_through_the_real_command():
    done = run_mmlm("eval-retrieval", "clip-tiny", "--dataset", "digits", "--ks", "[0]")
    assert done.returncode == 2
    assert "ks [0]: recall@k needs integers k >= 1" in error_line(done.stderr, "eval-retrieval")


@pytest.mark.parametrize(("args", "message"), [
    (["eval-retrieval", "--chunk-size", "0"], "chunk_size 0"),
    (["eval-retrieval", "--batch-size", "0"], "batch_size=0"),
    (["zeroshot", "--batch_size", "0"], "batch_size=0"),
])  # fmt: skip
def test_sizes_of_zero(args, message, capsys):
    line = fails_in_process(capsys, args[0], "clip-tiny", "--dataset", "digits", *args[1:])
    assert message in line
