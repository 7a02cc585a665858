"""`mmlm` as people type it: a fast --help that lists every command, dashes in options, and for every
mistake one line on stderr naming the bad value, exit code 2, no traceback (unless --debug / MMLM_DEBUG=1).

The real command runs in a subprocess for one case of each command; the variants of a case go through
``mmlm.cli.main`` in this process (the same entry point, without paying the imports again).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
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
    assert "usage:" not in stderr and "tip: For details" not in stderr, stderr  # no usage block
    lines = [line for line in stderr.splitlines() if line.startswith(f"mmlm {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def fails_in_process(capsys, *args: str, command: str | None = None) -> str:
    """``mmlm ARGS`` in this process: exit code 2 and its one error line (``command``: the words naming
    the command, when there are two, as ``index build``)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    return error_line(capsys.readouterr().err, command or args[0])


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
    public = ["CLIP", "CLIPConfig", "CoCa", "CoCaConfig", "TextConfig", "TextEncoder", "TextWithHeads", "VisionConfig",
              "VisionTransformer",
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
    with pytest.raises(ValueError, match="missing.pt"):
        main(["convert", missing, str(tmp_path / "out"), "--debug"])
    monkeypatch.setenv("MMLM_DEBUG", "1")
    with pytest.raises(ValueError, match="missing.pt"):
        main(["convert", missing, str(tmp_path / "out")])


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), KeyError("vision")])
def test_a_bug_inside_a_command_keeps_its_traceback(bug, tmp_path, monkeypatch):
    """A TypeError or KeyError raised inside mmlm is a bug, not the user's mistake: it propagates (Python prints
    the traceback, exit 1) instead of becoming one line and exit 2, which would hide it."""
    import mmlm.export.convert

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(mmlm.export.convert, "convert", broken)
    with pytest.raises(type(bug)):
        main(["convert", "clip-tiny", str(tmp_path / "out")])


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
    (["eval-retrieval", "--batch-size", "0"], "--batch_size 0: give 1 or more"),
    (["zeroshot", "--batch_size", "0"], "--batch_size 0: give 1 or more"),
    (["zeroshot", "--num_workers", "-1"], "--num_workers -1: give 0 or more"),
])  # fmt: skip
def test_sizes_of_zero(args, message, capsys):
    line = fails_in_process(capsys, args[0], "clip-tiny", "--dataset", "digits", *args[1:])
    assert message in line


# ------------------------------------------------------------------------------ option values the parser refuses


@pytest.mark.parametrize(("args", "message"), [
    (["search", "http://127.0.0.1:9", "a cat", "--k", "abc"], "--k abc: expected int"),
    (["convert", "clip-tiny", "out", "--to", "tflite"],
     "--to tflite: expected one of mmlm, hf, open_clip, timm, sentence_transformers, onnx"),
    (["explain", "clip-tiny", "x.png", "a cat", "--method", "lime"],
     "--method lime: expected one of similarity, rollout, gradcam, occlusion, attention"),
    (["serve", "idx", "--max-body-mb", "big"], "--max_body_mb big: expected float"),
])  # fmt: skip
def test_a_mistyped_value_is_one_line_naming_the_option(args, message, capsys):
    assert fails_in_process(capsys, *args).startswith(f"mmlm {args[0]}: error: {message} (add --debug")


def test_a_mistyped_lightning_value_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = fails_in_process(capsys, "fit", "--config", str(DIGITS), "--trainer.max_steps", "abc",
                            "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert "--trainer.max_steps abc: expected int" in line
    line = fails_in_process(capsys, "fit", "--config", str(DIGITS), "--model.init_args.nope", "3",
                            "--trainer.default_root_dir", str(tmp_path))  # fmt: skip
    assert "--model.init_args.nope 3: Option 'nope' is not accepted (by mmlm.tasks.ContrastiveAlignment)" in line
    assert not list(tmp_path.iterdir())


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nothere.yaml"
    line = fails_in_process(capsys, "fit", "--config", str(missing))
    assert f"--config: File does not exist: '{missing}'" in line


# ------------------------------------------------------------------------------ options checked before any work


@pytest.mark.parametrize("nprobe", ["-5", "0"])
def test_index_build_refuses_nprobe_before_embedding(nprobe, tmp_path, capsys):
    out = tmp_path / "idx"
    line = fails_in_process(capsys, "index", "build", "clip-tiny", "assets", "--out", str(out), "--index_type",
                            "IVF2,Flat", "--nprobe", nprobe, command="index build")  # fmt: skip
    assert f"--nprobe {nprobe}: give the IVF clusters searched per query, 1 or more" in line
    assert not list(tmp_path.iterdir())  # neither the index nor a .idx.partial


@pytest.mark.parametrize("option", ["max_index_memory", "max_train_memory"])
@pytest.mark.parametrize(("size", "message"), [("lots", "'lots': give a size such as 4G"), ("0", "'0': give a size above 0")])
def test_index_build_refuses_a_memory_budget_that_does_not_read(option, size, message, tmp_path, capsys):
    line = fails_in_process(capsys, "index", "build", "clip-tiny", "assets", "--out", str(tmp_path / "idx"),
                            f"--{option}", size, command="index build")  # fmt: skip
    assert f"--{option} {message}" in line
    assert not list(tmp_path.iterdir())


def test_index_build_names_what_it_needs_of_the_model(tmp_path, capsys):
    line = fails_in_process(capsys, "index", "build", "vit-tiny", "assets", "--out", str(tmp_path / "idx"),
                            command="index build")  # fmt: skip
    assert "vit-tiny is a VisionTransformer: an index of images and captions needs an image-text (CLIP) model" in line
    assert "zero-shot" not in line and not list(tmp_path.iterdir())


# on a machine without a GPU `cuda` itself is refused; cuda:99 is refused on every machine
DEVICES = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("args", [
    ["zeroshot", "clip-tiny", "--dataset", "digits"],
    ["eval-retrieval", "clip-tiny", "--dataset", "digits"],
    ["explain", "clip-tiny", "missing.png", "a cat"],
    ["serve", "missing-index"],
], ids=lambda args: args[0])  # fmt: skip
def test_a_device_this_machine_lacks_is_one_line_before_the_model(args, device, capsys):
    line = fails_in_process(capsys, *args, "--device", device)
    assert f"--device {device}: no CUDA device" in line


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "-1"], "--port -1: give a port from 1 to 65535 (0: any free one)"),
    (["--port", "70000"], "--port 70000: give a port from 1 to 65535 (0: any free one)"),
    (["--max_batch", "0"], "--max_batch 0: give 1 or more"),
    (["--max_body_mb", "0"], "--max_body_mb 0.0: give a size in MiB above 0"),
    (["--query_timeout_s", "0"], "--query_timeout_s 0.0: give seconds above 0"),
    (["--reload_s", "-1"], "--reload_s -1.0: give 0 or more"),
])  # fmt: skip
def test_serve_refuses_limits_out_of_range_before_loading(args, message, capsys):
    assert message in fails_in_process(capsys, "serve", "missing-index", *args)  # the index would fail next


# ------------------------------------------------------------------------------ files that are not what they say


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory) -> Path:
    from mmlm.compress import quantize_int8

    return mmlm.save(quantize_int8(mmlm.create_model("clip-tiny")), tmp_path_factory.mktemp("int8") / "clip-int8")


def test_quantize_an_int8_model_is_one_line(int8_folder, tmp_path, capsys):
    line = fails_in_process(capsys, "quantize", str(int8_folder), "--out", str(tmp_path / "again"))
    assert f"{int8_folder} is already int8: quantize the float model it was made from" in line
    assert not (tmp_path / "again").exists()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (grey, 8 bit), with one row of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_explain_a_decompression_bomb_is_one_line(tmp_path, capsys):
    image = tmp_path / "huge.png"
    image.write_bytes(png_header(20_000, 20_000))
    line = fails_in_process(capsys, "explain", "clip-tiny", str(image), "a cat", "--out", str(tmp_path / "h.png"))
    assert f"image {image}: Image size (400000000 pixels) exceeds limit" in line
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "the file is empty (0 bytes), not a checkpoint"),
    (b"PK\x03\x04 cut short", "not a complete checkpoint (a zip archive cut short)"),
    (b"epoch: 3\n", "not a PyTorch checkpoint (neither torch.save's zip nor a pickle)"),
])  # fmt: skip
def test_fit_ckpt_path_that_is_not_a_checkpoint(content, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(content)
    line = fails_in_process(capsys, "fit", "--config", str(DIGITS), "--ckpt_path", str(ckpt),
                            "--trainer.default_root_dir", str(tmp_path / "runs"))  # fmt: skip
    assert f"--ckpt_path {ckpt}: {message}" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("manifest", "message"), [
    ('{"format": "mmlm-index/1", ', "is not valid JSON (Expecting property name"),
    ("[1, 2]", "format 'list', not 'mmlm-index/1'"),
    ('{"format": "mmlm-index/1", "model": {}}', "is not a complete index manifest (no embedding, counts, indexes,"),
])  # fmt: skip
def test_index_info_on_a_malformed_manifest(manifest, message, tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(manifest)
    line = fails_in_process(capsys, "index", "info", str(tmp_path), command="index info")
    assert f"{tmp_path / 'manifest.json'}" in line and message in line


# ------------------------------------------------------------------------------ mmlm clip-benchmark


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    """A CLIP_benchmark wds folder with one shard of two images (what clip_benchmark_export_wds writes)."""
    import io

    import webdataset as wds
    from PIL import Image

    root = tmp_path_factory.mktemp("wds")
    (root / "test").mkdir()
    with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
        for i in range(2):
            png = io.BytesIO()
            Image.new("RGB", (32, 32), (255 * i, 0, 0)).save(png, format="PNG")
            sink.write({"__key__": f"s{i}", "png": png.getvalue(), "cls": i})
    (root / "test" / "nshards.txt").write_text("1")
    (root / "classnames.txt").write_text("black\nred\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\n")
    return root


def benchmark(*args: str) -> list[str]:
    return ["clip-benchmark", "eval", "--model_type", "mmlm", "--dataset", "wds/x", "--no_amp", "--quiet", *args]


def test_clip_benchmark_mistakes_are_one_line(one_shard, tmp_path, capsys):
    missing, empty = tmp_path / "missing", tmp_path / "empty.pt"
    empty.write_bytes(b"")
    (tmp_path / "root").mkdir()
    for args, message in [
        (["--model", str(missing), "--dataset_root", str(one_shard)],
         f"--model {missing}: no checkpoint file or folder (nor an mmlm preset name)"),
        (["--model", str(empty), "--dataset_root", str(one_shard), "--num_workers", "0"],
         f"{empty} is not a valid or complete PyTorch checkpoint"),
        (["--model", "clip-tiny", "--dataset_root", str(tmp_path / "root")],
         f"--dataset_root {tmp_path / 'root'}: no test/nshards.txt, so not a CLIP_benchmark WebDataset folder"),
        (["--model", "clip-tiny", "--dataset_root", str(one_shard)],  # CLIP_benchmark's default: 4 workers
         f"--num_workers 4: more than the 1 shards of {one_shard}/test; give --num_workers 1 or fewer"),
    ]:  # fmt: skip
        assert message in fails_in_process(capsys, *benchmark(*args, "--output", str(tmp_path / "r.json")))
    assert not (tmp_path / "r.json").exists()


def test_clip_benchmark_result_names_the_mmlm_checkpoint(one_shard, clip_folder, tmp_path, capsys):
    main(benchmark("--model", str(clip_folder), "--dataset_root", str(one_shard), "--num_workers", "0",
                   "--output", str(tmp_path / "r.json")))  # fmt: skip
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["model"], result["pretrained"]) == (str(clip_folder), str(clip_folder.resolve()))
    main(benchmark("--model", "clip-tiny", "--dataset_root", str(one_shard), "--num_workers", "0",
                   "--output", str(tmp_path / "p.json")))  # fmt: skip
    assert json.loads((tmp_path / "p.json").read_text())["pretrained"] == "random-init-seed0"  # as mmlm zeroshot
