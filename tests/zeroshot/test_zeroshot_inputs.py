"""Inputs of the evaluation commands: template and class-name files, bad samples, the confusion matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmlm.data import DIGIT_CLASSNAMES
from mmlm.data.eval_datasets import ImageCaptions, classification_data, retrieval_data
from mmlm.eval.zeroshot import OPENAI_IMAGENET_TEMPLATES, load_classnames, load_templates, save_confusion_matrix


def test_template_sets_and_files(tmp_path):
    assert load_templates("openai") == load_templates("imagenet") == list(OPENAI_IMAGENET_TEMPLATES)
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\nart of the {}.\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {c}.", "art of the {}."]
    (tmp_path / "t.json").write_text(json.dumps(["itap of a {}."]))
    assert load_templates(str(tmp_path / "t.json")) == ["itap of a {}."]
    (tmp_path / "bad.txt").write_text("a photo without a slot\n")
    with pytest.raises(ValueError, match="no '\\{\\}' or '\\{c\\}'"):
        load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="neither a built-in set"):
        load_templates("no-such-set")
    (tmp_path / "names.txt").write_text("tench\ngoldfish\n")
    assert load_classnames(tmp_path / "names.txt") == ["tench", "goldfish"]


def test_bad_samples_are_skipped_and_counted(tmp_path, digit_pngs):
    """A missing file and a corrupt one in a manifest, a shard member that is not an image: skipped, counted."""
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(digit_pngs[i][0])
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    rows = ["filepath,label"] + [f"{i}.png,{digit_pngs[i][1]}" for i in range(6)] + ["missing.png,3", "corrupt.png,4"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    data = classification_data(tmp_path / "m.csv", lambda im: torch.zeros(1), classnames=list(DIGIT_CLASSNAMES))
    loader = data.loader(batch_size=4)
    labels = torch.cat([b["label"] for b in loader])
    assert labels.tolist() == [digit_pngs[i][1] for i in range(6)]
    assert loader.stats.history[-1] == {"corrupt_image": 1, "missing_file": 1}

    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "png": digit_pngs[0][0], "txt": "a handwritten 0.\nthe digit zero."})
        sink.write({"__key__": "b", "png": b"broken", "txt": "a broken image"})
        sink.write({"__key__": "c", "png": digit_pngs[1][0], "txt": "  \n"})
    data = retrieval_data(str(tmp_path / "s.tar"), lambda im: torch.zeros(1))
    loader = data.loader(batch_size=8)
    batches = list(loader)
    assert [c for b in batches for c in b["captions"]] == [["a handwritten 0.", "the digit zero."]]
    assert loader.stats.history[-1] == {"corrupt_image": 1, "empty_text": 1}  # a blank txt is an empty caption


def test_manifest_groups_captions_by_image(tmp_path, digit_pngs):
    (tmp_path / "a.png").write_bytes(digit_pngs[0][0])
    (tmp_path / "b.png").write_bytes(digit_pngs[1][0])
    (tmp_path / "c.csv").write_text('filepath,title\na.png,first of a\nb.png,only b\na.png,"second, of a"\nb.png,\n')
    ds = ImageCaptions(tmp_path / "c.csv")
    assert len(ds) == 2
    assert ds[0]["captions"] == ["first of a", "second, of a"] and isinstance(ds[0]["image"], Image.Image)
    assert ds[1]["captions"] == ["only b"] and [s.reason for s in ds[1]["skipped"]] == ["empty_text"]


def test_confusion_matrix_counts_known_labels(tmp_path):
    """Counts written out by hand: rows are the true class, columns the prediction; class 3 never occurs."""
    labels = [0, 0, 1, 2, 2, 2, 1]
    preds = [0, 1, 1, 2, 0, 2, 3]
    counts = save_confusion_matrix(labels, preds, ["a", "b", "c", "d"], tmp_path / "cm.png")
    expected = [[1, 1, 0, 0],
                [0, 1, 0, 1],
                [1, 0, 2, 0],
                [0, 0, 0, 0]]  # fmt: skip
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize(("classes", "pixels"), [(10, 600), (40, 1400)])
def test_confusion_matrix_png(tmp_path, classes, pixels):
    """Random labels against a count of (label, prediction) pairs; the PNG decodes at the size asked for
    (6 inches, or 0.35 inch a class, at 100 dpi) and is not blank."""
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, classes, 500), rng.integers(0, classes, 500)
    counts = save_confusion_matrix(labels, preds, [f"class {i}" for i in range(classes)], tmp_path / "cm.png")
    pairs = np.bincount(labels * classes + preds, minlength=classes * classes).reshape(classes, classes)
    np.testing.assert_array_equal(counts, pairs)
    with Image.open(tmp_path / "cm.png") as im:
        im.load()  # decodes the whole file: a truncated PNG fails here
        assert im.format == "PNG" and im.size == (pixels, pixels)
        assert len(im.convert("RGB").getcolors(maxcolors=pixels * pixels)) > 20  # cells in shades of blue


def _strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_result_says_what_it_was_computed_on(tmp_path, tiny_checkpoint, digit_pngs):
    """3 classes and a missing file: the JSON counts 3 images used and 1 skipped, and acc5 (undefined with
    fewer than 5 classes) is null, not NaN, so strict JSON readers accept the file."""
    from mmlm.cli import zeroshot

    names = ["zero", "one", "two"]
    rows = ["filepath,label"]
    for label in range(3):
        png = next(png for png, y in digit_pngs if y == label)
        (tmp_path / f"{label}.png").write_bytes(png)
        rows.append(f"{label}.png,{names[label]}")
    rows.append("gone.png,one")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "zs.json"
    result = zeroshot(str(tiny_checkpoint), dataset=str(tmp_path / "m.csv"), classnames=None, templates="simple",
                      output=out)  # fmt: skip
    assert result["samples"] == {"used": 3, "skipped": {"missing_file": 1}}
    assert result["metrics"]["acc5"] is None
    assert _strict_json(out.read_text()) == result
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(result)  # CLIP_benchmark's keys
