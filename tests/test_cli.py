"""The `mmlm` command: every YAML instantiates, tiny configs train, DDP runs, a killed run resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmlm.cli import lightning_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY = [c for c in CONFIGS if "tiny" in c.name]
# full-size configs are instantiated with a tiny model and no GPU
SHRINK = {
    "mmlm.tasks.ContrastiveAlignment": ["--model.init_args.model", "clip-tiny"],
    "mmlm.tasks.LanguagePretraining": ["--model.init_args.model", "bert-tiny", "--model.init_args.model_overrides", "null"],
    "mmlm.tasks.ImageClassification": ["--model.init_args.model", "vit-tiny"],
}
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", "32"]


def task_of(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["model"]["class_path"]


def run_mmlm(*args: str, cwd: Path, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mmlm.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)  # fmt: skip


def test_configs_exist_for_every_kind_of_task():
    tasks = {task_of(c) for c in CONFIGS}
    assert {"mmlm.tasks.ContrastiveAlignment", "mmlm.tasks.LanguagePretraining"} <= tasks


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c.relative_to(ROOT / "configs")))
def test_every_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    extra = [] if "tiny" in config.name else SHRINK.get(task_of(config), []) + CPU
    cli = lightning_cli(["--config", str(config), *extra, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.trainer.max_steps > 0
    assert sum(p.numel() for p in cli.model.parameters()) > 0


@pytest.mark.parametrize("config", TINY, ids=lambda c: c.stem)
def test_tiny_configs_fit_a_few_steps(config, tmp_path):
    out = tmp_path / "run"
    result = run_mmlm(
        "fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(out),
        "--trainer.logger", "false", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out}/ckpt", cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    path = out / "ckpt" / "epoch=0-step=3.ckpt"
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3
    if "mmlm_config" in ckpt:  # tasks with one mmlm model: the checkpoint loads without the task
        import mmlm

        model = mmlm.load_pretrained(path)
        trained = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    else:
        # fine-tuning tasks hold an encoder and a head, not one mmlm model
        assert task_of(config).split(".")[-1] in (
            "ImageClassification", "TextClassification", "TokenClassification", "QuestionAnswering"
        )


DIGITS = ROOT / "configs" / "align" / "clip-digits-tiny.yaml"
# 1437 training digits / batch 256 = 5 optimizer steps per epoch; 3 epochs
SHORT = ["--data.init_args.batch_size", "256", "--trainer.max_steps", "15", "--trainer.limit_val_batches", "0",
         "--trainer.logger", "false", "--seed_everything", "0"]  # fmt: skip


def checkpoints(out: Path, every_n_steps: int | None = None) -> list[str]:
    """A ModelCheckpoint keeping every checkpoint: at each epoch end, or every n steps (mid-epoch)."""
    when = [f"--trainer.callbacks.every_n_train_steps={every_n_steps}"] if every_n_steps else \
        ["--trainer.callbacks.save_on_train_epoch_end=true"]
    return ["--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={out}", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=-1", *when]  # fmt: skip


def final_weights(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    return state["global_step"], state["state_dict"]


@pytest.mark.parametrize("every_n_steps, kill_after", [(None, "epoch=0-step=5.ckpt"), (3, "epoch=1-step=6.ckpt")],
                         ids=["epoch-end", "mid-epoch"])  # fmt: skip
def test_killed_run_resumes_to_the_same_step_and_weights(tmp_path, every_n_steps, kill_after):
    ref, cut = tmp_path / "uninterrupted", tmp_path / "killed"
    done = run_mmlm("fit", "--config", str(DIGITS), *SHORT, *checkpoints(ref, every_n_steps), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "mmlm.cli", "fit", "--config", str(DIGITS), *SHORT, *checkpoints(cut, every_n_steps)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / kill_after).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (cut / kill_after).exists(), "the run never wrote the checkpoint to be killed after"
    time.sleep(0.5)  # let it train on a little past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "epoch=2-step=15.ckpt").exists(), "the run finished before it was killed"
    step_at_kill, _ = final_weights(cut / "last.ckpt")
    assert 5 <= step_at_kill < 15

    resumed = run_mmlm("fit", "--config", str(DIGITS), *SHORT, *checkpoints(cut, every_n_steps), "--ckpt_path", "last",
                       cwd=ROOT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_step, ref_state = final_weights(ref / "epoch=2-step=15.ckpt")
    cut_step, cut_state = final_weights(cut / "epoch=2-step=15.ckpt")
    assert ref_step == cut_step == 15
    for name, value in ref_state.items():
        # equal weights: no optimizer step was repeated or skipped, and the data order is the same
        torch.testing.assert_close(cut_state[name], value, rtol=0, atol=0, msg=name)


def test_fit_runs_with_ddp_on_two_cpu_processes(tmp_path):
    result = run_mmlm(
        "fit", "--config", str(DIGITS), "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "4", "--data.init_args.batch_size", "32", "--trainer.val_check_interval", "4",
        "--trainer.limit_val_batches", "2", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path), *checkpoints(tmp_path / "ckpt"), cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    step, _ = final_weights(tmp_path / "ckpt" / "last.ckpt")
    assert step == 4


def test_predict_returns_unit_embeddings_for_test_data(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = lightning_cli(["--config", str(DIGITS), "--data.init_args.test_data", "digits", "--trainer.logger", "false",
                         "--trainer.callbacks", "[]", "--trainer.limit_predict_batches", "2",
                         "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    out = cli.trainer.predict(cli.model, cli.datamodule)
    assert len(out) == 2 and out[0]["image_embeds"].shape == (64, 32)
    torch.testing.assert_close(out[1]["text_embeds"].norm(dim=-1), torch.ones(64))
