"""Learning is real: short CPU runs of the tiny configs beat chance / their own starting point."""

import math
from pathlib import Path

import pytest
import torch

from mmlm.cli import lightning_cli

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip


# minutes of training each: left out of the quick tier
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and on a busy 2-core machine two threads that
    wait for each other made each step ~6x slower (1.4 s against 0.22 s for a clip-tiny step of 64 digits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(config: str, tmp_path: Path, *args: str):
    return lightning_cli(["--config", str(ROOT / config), *QUIET, "--trainer.default_root_dir", str(tmp_path), *args],
                         run=False)  # fmt: skip


def test_tiny_clip_learns_zero_shot_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = cli("configs/align/clip-digits-tiny.yaml", tmp_path, "--trainer.max_steps", "200",
              "--trainer.val_check_interval", "200")  # fmt: skip
    run.trainer.fit(run.model, run.datamodule)
    acc = float(run.trainer.callback_metrics["val/zeroshot_acc1"])
    assert acc > 0.5, f"held-out zero-shot accuracy {acc:.3f} (chance 0.1)"


def test_mlm_lowers_held_out_perplexity(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = cli("configs/pretrain/mlm-tiny.yaml", tmp_path, "--trainer.max_steps", "150",
              "--trainer.val_check_interval", "150", "--trainer.limit_val_batches", "4",
              "--trainer.inference_mode", "false")  # metric states made by validate() are reused by fit()  # fmt: skip
    before = run.trainer.validate(run.model, run.datamodule, verbose=False)[0]["val/mlm_perplexity"]
    run.trainer.fit(run.model, run.datamodule)
    after = float(run.trainer.callback_metrics["val/mlm_perplexity"])
    assert before > 0.9 * 4016  # untrained: about uniform over the 4,016-token vocabulary
    assert after < before / 4, f"held-out perplexity {before:.0f} -> {after:.0f}"
    assert math.isfinite(after)
