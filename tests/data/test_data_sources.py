"""One registry of data sources: zero-shot validation on any labelled image set, bundled assets from anywhere."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import webdataset as wds

from mmlm.data import ImageTextDataModule, digits_image_text
from mmlm.data.sources import find_shards, prompts
from mmlm.paths import ASSETS, resolve

NAMES = ["nought", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits(n: int = 12):
    ds = digits_image_text("test", seed=0)
    return [(ds.image(i), int(ds.labels[i]), ds.captions[i]) for i in range(n)]


def test_labelled_manifest_gives_zero_shot_validation(tmp_path):
    rows = []
    for i, (image, label, caption) in enumerate(_digits()):
        image.save(tmp_path / f"{i}.png")
        rows.append({"filepath": f"{i}.png", "title": caption, "label": NAMES[label]})
    with open(tmp_path / "val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title", "label"])
        writer.writeheader()
        writer.writerows(rows)
    dm = ImageTextDataModule(
        val_data=str(tmp_path / "val.csv"), preset="clip-tiny", batch_size=4, num_workers=0, label_key="label",
        classnames=NAMES, templates=["a scan of the digit {}."],
    )  # fmt: skip
    dm.setup("validate")
    labels = [int(y) for b in dm.val_dataloader() for y in b["label"]]
    assert labels == [label for _, label, _ in _digits()]  # names mapped through the given class order
    assert dm.classnames == NAMES and dm.templates == ["a scan of the digit {}."]

    # without classnames the manifest's own labels name the classes (sorted), with the default template
    dm = ImageTextDataModule(val_data=str(tmp_path / "val.csv"), preset="clip-tiny", batch_size=4, num_workers=0,
                             label_key="label")  # fmt: skip
    dm.setup("validate")
    assert dm.classnames == sorted({NAMES[y] for _, y, _ in _digits()}) and dm.templates == ["a photo of a {}."]
    # a caption set without labels has no zero-shot metric
    assert ImageTextDataModule(val_data=str(tmp_path / "val.csv"), preset="clip-tiny").classnames is None


def test_clip_benchmark_shard_folder_gives_labels_and_its_prompts(tmp_path):
    (tmp_path / "test").mkdir()
    with wds.TarWriter(str(tmp_path / "test" / "0.tar")) as sink:
        for i, (image, label, caption) in enumerate(_digits(6)):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            sink.write({"__key__": f"s{i}", "png": buf.getvalue(), "cls": str(label), "txt": caption})
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    (tmp_path / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of the number: {}.\n")
    assert find_shards(tmp_path, "test") == ([str(tmp_path / "test" / "0.tar")], tmp_path)
    assert prompts(tmp_path) == (NAMES, ["a photo of the number: {}."])
    dm = ImageTextDataModule(val_data=str(tmp_path), preset="clip-tiny", batch_size=3, num_workers=0)
    dm.setup("validate")
    labels = [int(y) for b in dm.val_dataloader() for y in b["label"]]
    assert labels == [label for _, label, _ in _digits(6)]
    assert dm.classnames == NAMES and dm.templates == ["a photo of the number: {}."]


def test_digits_carry_their_own_prompts():
    names, templates = prompts("digits")
    assert names[3] == "three" and all("{}" in t for t in templates)


def test_bundled_assets_resolve_from_any_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ASSETS == Path(__file__).resolve().parents[2] / "assets"  # the top-level folder of the source tree
    assert resolve("assets/tokenizer") == ASSETS / "tokenizer" and (ASSETS / "tokenizer" / "tokenizer.json").is_file()
    (tmp_path / "assets").mkdir()  # a user's own assets folder in the working directory wins
    (tmp_path / "assets" / "corpus.txt").write_text("mine\n")
    assert resolve("assets/corpus.txt") == Path("assets/corpus.txt")


# Where `assets/tokenizer` resolves in an interpreter that sees only site-packages folders given to it (-S keeps
# the shared venv's own editable mmlm out); mmlm.paths needs nothing beyond the standard library.
WHERE = "import site, sys; site.addsitedir(sys.argv[1]); from mmlm.paths import resolve; print(resolve('assets/tokenizer'))"


@pytest.mark.slow
def test_wheel_and_editable_install_ship_the_assets_every_config_names(tmp_path):
    root = Path(__file__).resolve().parents[2]
    source = tmp_path / "src"  # setuptools writes build/ and *.egg-info beside the sources: build a copy
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "runs",
                                                                  ".pytest_cache", "tests", "docs"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "-q", "--no-input"]
    offline = {"cwd": tmp_path, "check": True, "capture_output": True, "env": {**os.environ, "PIP_NO_INDEX": "1"}}
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)], **offline)
    (wheel,) = tmp_path.glob("mmlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    named = {
        line.split("assets/", 1)[1].split()[0].rstrip(",")
        for config in (root / "configs").rglob("*.yaml")
        for line in config.read_text().splitlines()
        if "assets/" in line and not line.lstrip().startswith("#")
    }
    assert named >= {"corpus.txt", "tokenizer", "captions.csv"}
    for rel in named:
        assert any(n == f"mmlm/assets/{rel}" or n.startswith(f"mmlm/assets/{rel}/") for n in names), rel
    assert {f"mmlm/assets/{p.relative_to(root / 'assets').as_posix()}" for p in (root / "assets").rglob("*")
            if p.is_file()} <= names  # fmt: skip
    # pyproject.toml lists the packages (for the assets mapping): every module of mmlm/ must still be in the wheel
    assert {p.relative_to(root).as_posix() for p in (root / "mmlm").rglob("*.py")} <= names

    # `assets/...` from another working folder: inside an installed wheel, and in an editable install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    installed = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(installed), str(wheel)], **offline)
    where = subprocess.run([sys.executable, "-S", "-c", WHERE, str(installed)], cwd=elsewhere, check=True,
                           capture_output=True, text=True, env={})  # fmt: skip
    assert Path(where.stdout.strip()) == installed / "mmlm" / "assets" / "tokenizer"
    assert (installed / "mmlm" / "assets" / "tokenizer" / "tokenizer.json").is_file()
    # the editable wheel `pip install -e` would build (PEP 660), installed with --target: `pip install --prefix -e`
    # would uninstall the mmlm of the environment running these tests
    build = "import setuptools.build_meta as b, sys; print(b.build_editable(sys.argv[1]))"
    editable = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=source, check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]  # fmt: skip
    site_packages = tmp_path / "editable"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site_packages), str(tmp_path / editable)], **offline)
    where = subprocess.run([sys.executable, "-S", "-c", WHERE, str(site_packages)], cwd=elsewhere, check=True,
                           capture_output=True, text=True, env={})  # fmt: skip
    assert Path(where.stdout.strip()) == source / "assets" / "tokenizer"


@pytest.mark.parametrize("spec", ["missing.csv", "assets/missing.csv"])
def test_a_missing_source_names_itself(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = ImageTextDataModule(val_data=spec, preset="clip-tiny", num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        dm.setup("validate")
