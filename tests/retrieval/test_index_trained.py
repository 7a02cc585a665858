"""The tiny CLIP the main job trains (configs/align/clip-digits-tiny.yaml, briefly): an index of the
held-out digits answers "a photo of the number N" with an image of digit N first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmlm.cli import lightning_cli
from mmlm.data.digits import DIGIT_CLASSNAMES
from mmlm.factory import load
from mmlm.retrieval import build_index

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def test_text_to_image_search_over_held_out_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = lightning_cli(["--config", str(ROOT / "configs/align/clip-digits-tiny.yaml"), *QUIET,
                         "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "200",
                         "--trainer.val_check_interval", "200"], run=False)  # fmt: skip
    run.trainer.fit(run.model, run.datamodule)
    checkpoint = tmp_path / "last.ckpt"
    run.trainer.save_checkpoint(checkpoint)  # a `mmlm fit` checkpoint is a MODEL spec like any other
    index = build_index(str(checkpoint), "digits", tmp_path / "ix", split="test", accelerator="cpu")
    assert len(index) == 360  # scikit-learn's held-out fifth: never trained on

    loaded = load(checkpoint)
    model = loaded.model
    queries = [f"a photo of the number {name}." for name in DIGIT_CLASSNAMES] + \
        [f"a photo of the number {digit}." for digit in range(10)]  # fmt: skip
    tokens = loaded.require_tokenizer()(queries)
    with torch.no_grad():
        embeddings = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    ids, _ = index.search(embeddings, k=1)
    first = [row["label"] for row in index.metadata(ids[:, 0])]
    hits = sum(label == digit % 10 for digit, label in enumerate(first))
    assert hits >= 0.9 * len(queries), f"{hits}/{len(queries)} queries found their digit first: {first}"
