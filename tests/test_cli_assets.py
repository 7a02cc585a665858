"""Every command that reads a file or folder resolves ``assets/...`` (mmlm.paths.resolve) from any working folder."""

from __future__ import annotations

import json
import shutil

import pytest

import mmlm.paths
from mmlm import save
from mmlm.cli import main
from mmlm.factory import resolve
from mmlm.paths import ASSETS
from mmlm.retrieval import Index


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """The bundled assets plus a model, class names and templates (what no real bundle has), as `assets/...`;
    the working folder is one without an assets/ of its own."""
    folder = tmp_path / "bundle"
    shutil.copytree(ASSETS, folder)
    save(resolve("clip-tiny", seed=0), folder / "clip")
    save(resolve("bert-tiny", seed=0, overrides={"vocab_size": 4016}), folder / "bert")  # assets/tokenizer's size
    (folder / "names.txt").write_text("\n".join(f"digit {d}" for d in "0123456789") + "\n")
    (folder / "templates.txt").write_text("a scan of {}.\n")
    monkeypatch.setattr(mmlm.paths, "ASSETS", folder)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return folder


@pytest.mark.slow  # runs six commands: 2.5 s each test
def test_image_and_text_inputs_resolve_assets_from_another_folder(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    main(["explain", "assets/clip", "assets/images/chelsea.jpg", "a cat", "--method", "similarity",
          "--out", str(out / "heat.png")])  # fmt: skip
    assert (out / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["demo", "--manifest", "assets/captions.csv"])
    assert "21 images (rows) x 21 captions" in capsys.readouterr().out
    main(["tokenizer", "train", "assets/corpus.txt", "--vocab_size", "300", "--out", str(out / "tok")])
    assert len(json.loads((out / "tok" / "tokenizer.json").read_text())["model"]["vocab"]) == 300
    main(["convert", "assets/bert", str(out / "hf"), "--to", "hf", "--tokenizer", "assets/tokenizer"])
    assert (out / "hf" / "vocab.txt").read_text() == (bundle / "tokenizer" / "vocab.txt").read_text()


@pytest.mark.slow  # runs six commands: 2.5 s each test
def test_datasets_and_prompt_files_resolve_assets_from_another_folder(bundle, tmp_path, capsys):
    main(["zeroshot", "assets/clip", "--dataset", "digits", "--classnames", "assets/names.txt",
          "--templates", "assets/templates.txt", "--output", str(tmp_path / "zs.json")])  # fmt: skip
    result = json.loads((tmp_path / "zs.json").read_text())
    assert result["samples"] == {"used": 360, "skipped": {}} and 0 <= result["metrics"]["acc1"] <= 1
    main(["eval-retrieval", "assets/clip", "--dataset", "assets/captions.csv", "--output", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["samples"] == {"used": 21, "skipped": {}}
    main(["index", "build", "assets/clip", "assets/captions.csv", "--out", str(tmp_path / "ix"), "--accelerator",
          "cpu"])  # fmt: skip
    with Index.open(tmp_path / "ix") as index:
        assert index.manifest["counts"]["items"] == 21
