"""Captioning is learned: configs/caption/coca-digits-tiny.yaml, as shipped (600 steps, ~5 min on one busy CPU
thread), names the right digit in at least 90% of the held-out captions and keeps zero-shot accuracy high."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mmlm.cli import lightning_cli
from mmlm.data.digits import DIGIT_CLASSNAMES, digits_image_text
from mmlm.data.transforms import image_transform

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip

pytestmark = pytest.mark.slow


def names_digit(caption: str, label: int) -> bool:
    found = {d for d, word in enumerate(DIGIT_CLASSNAMES) if re.search(rf"\b({word}|{d})\b", caption)}
    return found == {label}


def test_tiny_coca_captions_held_out_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: two threads waiting for each other on a busy CPU are far slower
    try:
        run = lightning_cli(["--config", str(ROOT / "configs/caption/coca-digits-tiny.yaml"), *QUIET,
                             "--trainer.default_root_dir", str(tmp_path), "--trainer.val_check_interval", "600"],
                            run=False)  # fmt: skip
        run.trainer.fit(run.model, run.datamodule)
        assert float(run.trainer.callback_metrics["val/zeroshot_acc1"]) > 0.9
        model, tok = run.model.model.eval(), run.datamodule.tokenizer
        data = digits_image_text("test", seed=0)
        transform = image_transform(model.cfg.vision, train=False)
        images = torch.stack([transform(data.image(i)) for i in range(len(data))])
        ids = model.generate(images, max_new_tokens=16)
    finally:
        torch.set_num_threads(threads)
    eot = model.cfg.text.eot_token_id
    captions = [tok.decode(row[: row.index(eot)] if eot in row else row) for row in ids.tolist()]
    right = sum(names_digit(c, int(y)) for c, y in zip(captions, data.labels))
    assert right / len(data) >= 0.9, captions[:10]
