"""CLIP_benchmark's own command line gives `mmlm zeroshot`'s numbers on the digits test split.

Two ways in, each a separate process running CLIP_benchmark's ``main``:

- ``clip_benchmark eval --model_type open_clip --model local-dir:DIR`` on an exported open_clip
  folder, in a process that cannot import mmlm;
- ``mmlm clip-benchmark eval --model_type mmlm --model CHECKPOINT`` (``mmlm.eval.clip_benchmark.cli``).

The data is the digits test split in CLIP_benchmark's WebDataset layout, which ``mmlm zeroshot``
also reads. CLIP_benchmark 1.6.2's ``accuracy`` fails on numpy >= 2.4 (LAION-AI/CLIP_benchmark#147):
the console script runs with a ``sitecustomize`` that replaces it only where it fails, as a user on
numpy 2.4 must; ``mmlm clip-benchmark`` does the same by itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _client import _GUARD, run_command

import mmlm
from mmlm.cli import zeroshot
from mmlm.data import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, write_clip_benchmark_wds
from mmlm.data.eval_datasets import classification_data
from mmlm.data.tokenizers import clip_tokenizer
from mmlm.data.transforms import image_transform
from mmlm.eval.zeroshot import build_classifier, zero_shot_classify
from mmlm.export import export

TEMPLATES = [t.replace("{}", "{c}") for t in DIGIT_TEMPLATES]  # CLIP_benchmark's placeholder is {c}
NUMPY_2_4_FIX = """
import torch
from clip_benchmark.metrics import zeroshot_classification as zsc

def _accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0).item() / len(target) for k in topk]

try:
    zsc.accuracy(torch.eye(2), torch.arange(2))
except TypeError:  # numpy >= 2.4: float() of a one-element 1-d array
    zsc.accuracy = _accuracy
"""
# fp32 as mmlm zeroshot (the default --amp autocasts to bf16 on a CPU); --num_workers at most the shard count
COMMON = ["--dataset", "wds/digits", "--no_amp", "--num_workers", "0", "--batch_size", "64", "--quiet"]
MMLM_CLI = "import sys; from mmlm.eval.clip_benchmark import cli; sys.exit(cli(sys.argv[1:]))"
REPO = Path(mmlm.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random clip-tiny, shaken so that its predictions spread over the classes."""
    torch.manual_seed(0)
    model = mmlm.create_model("clip-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return mmlm.save(model, tmp_path_factory.mktemp("ckpt") / "clip-tiny")


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory) -> Path:
    """The 360 scans of the digits test split as CLIP_benchmark's wds folder: 2 shards of PNG + cls."""
    return write_clip_benchmark_wds(tmp_path_factory.mktemp("wds") / "digits")


@pytest.fixture(scope="module")
def reference(checkpoint, wds_root, tmp_path_factory) -> dict:
    """`mmlm zeroshot` on the wds folder, and mmlm's classifier and per-image predictions there."""
    out = tmp_path_factory.mktemp("mmlm_zeroshot") / "result.json"
    result = zeroshot(str(checkpoint), dataset=str(wds_root), output=out)
    model = mmlm.load(checkpoint)
    data = classification_data(str(wds_root), image_transform(model.cfg.vision, train=False))
    tok = clip_tokenizer(model.cfg.text.context_length)
    _, logits, _ = zero_shot_classify(model, tok, data.loader(64), data.classes, data.templates, progress=False)
    assert data.classes == list(DIGIT_CLASSNAMES) and data.templates == TEMPLATES
    assert logits.argmax(1).unique().numel() >= 3  # predictions spread: agreeing on them means something
    classifier = build_classifier(model, tok, data.classes, data.templates)
    print(f"[mmlm zeroshot] wds digits: {result['metrics']}")
    return {"metrics": result["metrics"], "used": result["samples"]["used"], "classifier": classifier}


def _assert_same_metrics(theirs: dict, ours: dict) -> None:
    assert set(theirs) == {"acc1", "acc5", "mean_per_class_recall"}
    for key, value in ours.items():
        assert theirs[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.slow
def test_clip_benchmark_console_script_on_exported_open_clip(checkpoint, wds_root, reference, tmp_path):
    folder = export(mmlm.load(checkpoint), tmp_path / "open_clip", "open_clip")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_GUARD + NUMPY_2_4_FIX)  # also: no mmlm in this process
    run_command(
        [str(Path(sys.executable).with_name("clip_benchmark")), "eval", "--model_type", "open_clip",
         "--model", f"local-dir:{folder}", "--pretrained", "", "--dataset_root", str(wds_root),
         "--output", "result.json", "--save_clf", "classifier.pt", *COMMON],
        cwd=tmp_path, PYTHONPATH=str(tmp_path / "site"),
    )  # fmt: skip
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"[clip_benchmark open_clip local-dir] {result['metrics']}")
    assert (result["dataset"], result["model"], result["pretrained"]) == ("wds/digits", f"local-dir:{folder}", "")
    assert result["task"] == "zeroshot_classification" and reference["used"] == 360
    _assert_same_metrics(result["metrics"], reference["metrics"])
    classifier = torch.load(tmp_path / "classifier.pt")  # (D, classes): the texts side, per class
    gap = (classifier - reference["classifier"]).abs().max().item()
    print(f"[clip_benchmark open_clip local-dir] classifier vs mmlm: max|diff| = {gap:.1e}")
    torch.testing.assert_close(classifier, reference["classifier"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_mmlm_clip_benchmark_command(checkpoint, wds_root, reference, tmp_path):
    """CLIP_benchmark's documented form, `--model PATH` without --pretrained, on model type mmlm."""
    run_command(
        [sys.executable, "-c", MMLM_CLI, "eval", "--model_type", "mmlm", "--model", str(checkpoint),
         "--dataset_root", str(wds_root), "--output", "result.json", *COMMON],
        cwd=tmp_path, PYTHONPATH=str(REPO),
    )  # fmt: skip
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"[mmlm clip-benchmark] {result['metrics']}")
    assert (result["dataset"], result["model"]) == ("wds/digits", str(checkpoint))
    assert result["pretrained"] == str(checkpoint.resolve())  # the checkpoint, as `mmlm zeroshot` records it
    _assert_same_metrics(result["metrics"], reference["metrics"])
