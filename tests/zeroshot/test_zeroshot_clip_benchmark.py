"""CLIP_benchmark's own zero-shot evaluation on an mmlm model (through mmlm's loader) agrees with `mmlm zeroshot`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import mmlm
from mmlm.cli import main, zeroshot
from mmlm.config import from_name, update
from mmlm.data import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, get_tokenizer, write_clip_benchmark_wds
from mmlm.eval.clip_benchmark import BenchmarkModel, BenchmarkTokenizer, load_clip_benchmark, register_clip_benchmark
from mmlm.eval.zeroshot import build_classifier

zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
open_clip = pytest.importorskip("open_clip")

TEMPLATES = [t.replace("{}", "{c}") for t in DIGIT_TEMPLATES]  # CLIP_benchmark's placeholder is {c}


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's ``accuracy`` line for line, ending in ``.item()``: its ``float()`` of a
    one-element 1-d array raises on numpy >= 2.4."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0).item() / len(target) for k in topk]


@pytest.fixture(scope="module", autouse=True)
def _numpy_2_4_fix():
    try:
        zsc.accuracy(torch.eye(2), torch.arange(2))
        yield
    except TypeError:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(zsc, "accuracy", _accuracy)
            yield


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, digits_folder):
    """CLIP_benchmark on the digits ImageFolder: its metrics, classifier, logits and targets."""
    model, transform, tokenizer = load_clip_benchmark(str(tiny_checkpoint))
    ds = ImageFolder(str(digits_folder), transform)
    loader = DataLoader(ds, batch_size=64)
    metrics = zsc.evaluate(model, loader, tokenizer, ds.classes, TEMPLATES, "cpu", amp=False)
    classifier = zsc.zero_shot_classifier(model, tokenizer, ds.classes, TEMPLATES, "cpu", amp=False)
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    print(f"[CLIP_benchmark] digits ImageFolder: {metrics}")
    return {"metrics": metrics, "classifier": classifier, "logits": logits, "target": target, "classes": ds.classes}


@pytest.fixture(scope="module")
def templates_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "templates.txt"
    path.write_text("\n".join(TEMPLATES) + "\n")
    return path


@pytest.fixture(scope="module")
def clip_benchmark_wds(tmp_path_factory):
    """The digits test split in CLIP_benchmark's WebDataset layout (what clip_benchmark_export_wds writes)."""
    return write_clip_benchmark_wds(tmp_path_factory.mktemp("wds") / "digits")


def _assert_same_metrics(ours: dict, ref: dict) -> None:
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


@pytest.mark.slow
def test_classifier_and_logits_equal_clip_benchmark(reference, tiny_checkpoint, digits_folder):
    """Per image, not just per metric: CLIP_benchmark's logits through the loader equal mmlm's own path."""
    from mmlm.data import image_transform
    from mmlm.data.eval_datasets import classification_data
    from mmlm.eval.zeroshot import zero_shot_classify

    model = mmlm.load(tiny_checkpoint).eval()
    tok = get_tokenizer("clip", context_length=model.cfg.text.context_length)
    weights = build_classifier(model, tok, reference["classes"], TEMPLATES)
    gap = (weights - reference["classifier"]).abs().max().item()
    print(f"[zero-shot] classifier vs CLIP_benchmark zero_shot_classifier: max|diff| = {gap:.2e}")
    torch.testing.assert_close(weights, reference["classifier"], atol=1e-5, rtol=0)

    data = classification_data(digits_folder, image_transform(model.cfg.vision, train=False))
    assert data.classes == reference["classes"]
    _, logits, labels = zero_shot_classify(model, tok, data.loader(64), data.classes, TEMPLATES, progress=False)
    assert torch.equal(labels, reference["target"])
    torch.testing.assert_close(logits, reference["logits"], atol=1e-4, rtol=0)
    assert torch.equal(logits.argmax(1), reference["logits"].argmax(1))
    assert logits.argmax(1).unique().numel() >= 3  # the predictions are spread, so agreement means something


@pytest.mark.parametrize("kind", ["digits", "wds", *(pytest.param(k, marks=pytest.mark.slow) for k in ("folder", "csv"))])
def test_mmlm_zeroshot_equals_clip_benchmark(
    kind, reference, tiny_checkpoint, digits_folder, clip_benchmark_wds, templates_file, tmp_path, digit_pngs
):
    """`mmlm zeroshot` on every kind of dataset holding the same 360 images gives CLIP_benchmark's numbers."""
    if kind == "folder":
        dataset = str(digits_folder)
    elif kind == "csv":  # named labels; the manifest lists the files of the ImageFolder
        rows = ["filepath,label"] + [f"{p.relative_to(digits_folder)},{p.parent.name}"
                                     for p in sorted(digits_folder.rglob("*.png"))]  # fmt: skip
        (digits_folder / "manifest.csv").write_text("\n".join(rows) + "\n")
        dataset = str(digits_folder / "manifest.csv")
    elif kind == "digits":  # same pixels, classes in 0..9 order: the metrics do not depend on class order
        dataset = "digits"
    else:  # classnames and templates come from the folder
        dataset = str(clip_benchmark_wds)
    templates = None if kind == "wds" else str(templates_file)
    out = tmp_path / "result.json"
    if kind == "digits":  # through the `mmlm zeroshot` command line and its own argument parsing
        main(["zeroshot", str(tiny_checkpoint), "--dataset", dataset, "--templates", templates, "--output", str(out)])
        result = json.loads(out.read_text())
    else:
        result = zeroshot(str(tiny_checkpoint), dataset=dataset, templates=templates, output=out, batch_size=50)
    _assert_same_metrics(result["metrics"], reference["metrics"])
    assert json.loads(out.read_text()) == result
    assert set(result) == {"dataset", "model", "pretrained", "task", "metrics", "language", "samples"}
    assert result["task"] == "zeroshot_classification" and result["language"] == "en"
    assert result["samples"] == {"used": len(digit_pngs), "skipped": {}}  # all 360 scans of the test split


def test_clip_benchmark_reads_its_wds_folder_like_mmlm(clip_benchmark_wds, tiny_checkpoint, reference):
    """CLIP_benchmark's own WebDataset reader on the same shards gives the same numbers as `mmlm zeroshot`."""
    from clip_benchmark.datasets.builder import build_dataset

    model, transform, tokenizer = load_clip_benchmark(str(tiny_checkpoint))
    ds = build_dataset("wds/digits", root=str(clip_benchmark_wds), transform=transform, split="test")
    assert ds.classes == list(DIGIT_CLASSNAMES) and ds.templates == TEMPLATES
    loader = DataLoader(ds, batch_size=64)
    ref = zsc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, "cpu", amp=False)
    _assert_same_metrics(ref, reference["metrics"])


@pytest.mark.slow  # the whole command: 2 s; the other tests compare the same numbers
def test_cli_writes_json_and_confusion_matrix(tiny_checkpoint, digits_folder, templates_file, tmp_path, reference):
    """`mmlm zeroshot ...` through the command's own argument parsing."""
    out, png = tmp_path / "zs.json", tmp_path / "zs.png"
    main(["zeroshot", str(tiny_checkpoint), "--dataset", str(digits_folder), "--templates", str(templates_file),
          "--output", str(out), "--confusion_matrix", str(png), "--batch_size", "32"])  # fmt: skip
    result = json.loads(out.read_text())
    _assert_same_metrics(result["metrics"], reference["metrics"])
    assert result["model"] == str(tiny_checkpoint) and result["pretrained"] == str(tiny_checkpoint.resolve())
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) >= 400


def test_loader_registers_as_a_clip_benchmark_model_type(tiny_checkpoint):
    from clip_benchmark import models

    register_clip_benchmark()
    assert "mmlm" in models.MODEL_TYPES
    model, transform, tokenizer = models.load_clip("mmlm", str(tiny_checkpoint), "", None, "cpu")
    image = transform(Image.new("RGB", (40, 30), "white"))[None]
    with torch.no_grad():
        assert model.encode_image(image).shape == (1, 32)
        assert model.encode_text(tokenizer(["a handwritten 7."])).shape == (1, 32)


def test_tokenizer_ids_equal_open_clip():
    texts = ["a photo of a cat.", "A HANDWRITTEN 7!", "a blurry low resolution image of the number nine."]
    ours = BenchmarkTokenizer(get_tokenizer("clip"), context_length=77)(texts)
    assert torch.equal(ours, open_clip.get_tokenizer("ViT-B-32")(texts))


def test_wrapper_rebuilds_the_mask_a_bidirectional_text_tower_needs():
    """CLIP_benchmark passes ids only. The wrapper's mask must make padded ids encode as the masked batch does;
    with a text tower that attends both ways, dropping the mask would change the embeddings."""
    torch.manual_seed(0)
    model = mmlm.create_model(update(from_name("clip-tiny"), **{"text.causal": False})).eval()
    tok = get_tokenizer("clip", context_length=32)
    texts = ["a photo of a cat.", "a handwritten 7.", "the digit nine written by hand, blurry and low resolution."]
    with torch.no_grad():
        ref = model.encode_text(**tok(texts))
        ids = BenchmarkTokenizer(tok, context_length=32)(texts)
        ours = BenchmarkModel(model).encode_text(ids, normalize=True)
        unmasked = model.encode_text(ids)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert (unmasked - ref).abs().max() > 1e-3
