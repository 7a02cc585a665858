"""Writing models: nothing is overwritten unasked, files get the user's umask, loading gives eval mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import mmlm
from mmlm.export.convert import convert


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return mmlm.save(mmlm.create_model("clip-tiny"), tmp_path_factory.mktemp("src") / "clip")


def test_save_refuses_a_folder_that_holds_files(tmp_path):
    model = mmlm.create_model("vit-tiny")
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # --overwrite replaces an mmlm model folder, never a folder of the user's
        with pytest.raises(FileExistsError, match=f"{tmp_path} already exists and holds files mmlm did not write"):
            mmlm.save(model, tmp_path, overwrite=overwrite)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    mmlm.save(model, empty)  # an existing empty folder is fine
    with pytest.raises(FileExistsError, match=f"{empty} already exists \\(an mmlm model\\).*--overwrite"):
        mmlm.save(model, empty)
    mmlm.save(mmlm.create_model("vit-tiny", depth=1), empty, overwrite=True)  # an mmlm model folder is replaced
    assert mmlm.load(empty).cfg.depth == 1


def test_convert_refuses_to_replace_a_model(tmp_path, clip_folder):
    dst = convert(clip_folder, tmp_path / "out")
    before = (dst / "model.safetensors").read_bytes()
    other = mmlm.create_model("clip-tiny")  # different random weights
    other_folder = mmlm.save(other, tmp_path / "other")
    with pytest.raises(FileExistsError, match=f"{dst}.*--overwrite"):
        convert(other_folder, dst)
    assert (dst / "model.safetensors").read_bytes() == before
    convert(other_folder, dst, overwrite=True)
    torch.testing.assert_close(mmlm.load(dst).state_dict(), other.state_dict(), rtol=0, atol=0)


def test_export_hf_clip_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite"):
        mmlm.export_hf_clip(mmlm.create_model("clip-tiny"), tmp_path)
    assert (tmp_path / "config.json").read_text() == "{}"


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, expected):
    """safetensors writes through a 0600 temp file; every written file must get 0o666 & ~umask, as open() does."""
    umask(mask)
    clip = mmlm.create_model("clip-tiny")
    ours = mmlm.save(clip, tmp_path / "ours")
    hf = mmlm.export_hf_clip(clip, tmp_path / "hf")
    for path in [ours / "model.safetensors", ours / "config.json", hf / "model.safetensors", hf / "config.json"]:
        assert _mode(path) == expected, f"{path.name}: {oct(_mode(path))}"


def test_load_returns_the_model_in_eval_mode(tmp_path):
    """Patch dropout is random in training mode: a loaded model must give the same embedding twice."""
    model = mmlm.create_model("clip-tiny", vision={"patch_dropout": 0.5})
    mmlm.save(model, tmp_path / "m")
    loaded = mmlm.load(tmp_path / "m")
    assert not any(m.training for m in loaded.modules())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), loaded.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_image(images), model.eval().encode_image(images), rtol=0, atol=0)


@pytest.mark.slow
def test_demo_and_convert_take_the_checkpoint_fit_writes(tmp_path, monkeypatch, capsys):
    """`mmlm demo --checkpoint RUN.ckpt`: the .ckpt of a one-step `mmlm fit` gives the similarities of the
    weights that run ended with, the same as through `mmlm convert RUN.ckpt DIR` and an mmlm folder."""
    from mmlm.cli import demo, lightning_cli, main

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    cli = lightning_cli(["fit", "--config", "configs/align/clip-digits-tiny.yaml", "--trainer.max_steps", "1",
                         "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path / "runs"),
                         "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])  # fmt: skip
    (ckpt,) = tmp_path.glob("runs/**/last.ckpt")
    trained = mmlm.save(cli.model.model, tmp_path / "trained")  # the weights in memory at the end of fit
    main(["convert", str(ckpt), str(tmp_path / "converted")])
    capsys.readouterr()
    from_ckpt = demo(checkpoint=str(ckpt))
    assert f"'{ckpt}'" in capsys.readouterr().out
    torch.testing.assert_close(from_ckpt, demo(checkpoint=str(trained)), rtol=0, atol=0)
    torch.testing.assert_close(from_ckpt, demo(checkpoint=str(tmp_path / "converted")), rtol=0, atol=0)
    assert not torch.allclose(from_ckpt, demo(preset="clip-tiny", seed=0))  # the run changed the weights
