"""The `mmlm` command: every YAML instantiates, tiny configs train, runs never share a folder, DDP runs,
a killed run resumes, the end of a run is saved, predict writes its outputs, mistakes give one line."""

import inspect
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mmlm.tasks
from mmlm.cli import lightning_cli, main

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
# configs that start from another run's output (the main job's checkpoint, a pruned folder) get a preset instead
AFTER_ANOTHER_RUN = {
    "distill-digits-tiny": ["--model.init_args.teacher", "clip-tiny"],
    "prune-recover-digits-tiny": ["--model.init_args.model", "clip-tiny"],
}


def task_of(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["model"]["class_path"]


def run_mmlm(*args: str, cwd: Path, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mmlm.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)  # fmt: skip


def test_configs_exist_for_every_kind_of_task():
    tasks = {f"mmlm.tasks.{name}" for name in mmlm.tasks.__all__
             if inspect.isclass(getattr(mmlm.tasks, name)) and issubclass(getattr(mmlm.tasks, name), mmlm.tasks.Task)
             and getattr(mmlm.tasks, name) is not mmlm.tasks.Task}  # fmt: skip
    assert len(tasks) == 8  # alignment, captioning, distillation, pretraining, image / text / token classification, QA
    assert {task_of(c) for c in CONFIGS} == tasks
    assert {task_of(c) for c in TINY} == tasks  # each trains on a laptop CPU too


def output_paths(config: dict) -> list[str]:
    """Every path-valued output option anywhere in a YAML (``dirpath``, ``save_dir``, ``log_dir``)."""
    if isinstance(config, dict):
        found = [f"{k}: {v}" for k, v in config.items() if k in ("dirpath", "save_dir", "log_dir")]
        return found + [p for v in config.values() for p in output_paths(v)]
    return [p for v in config for p in output_paths(v)] if isinstance(config, list) else []


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c.relative_to(ROOT / "configs")))
def test_every_config_instantiates_and_writes_only_under_its_root(config, tmp_path, monkeypatch):
    import yaml

    assert output_paths(yaml.safe_load(config.read_text())) == []  # trainer.default_root_dir is the one root
    monkeypatch.chdir(ROOT)
    extra = AFTER_ANOTHER_RUN.get(config.stem, []) if "tiny" in config.name else SHRINK.get(task_of(config), []) + CPU
    cli = lightning_cli(["--config", str(config), *extra, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.trainer.max_steps > 0
    assert sum(p.numel() for p in cli.model.parameters()) > 0
    run = tmp_path.resolve() / "version_0"
    assert [Path(c.dirpath) for c in cli.trainer.checkpoint_callbacks] == [run / "checkpoints"]
    assert {Path(logger.log_dir).resolve() for logger in cli.trainer.loggers} == {run, run / "tb"}


@pytest.mark.slow
@pytest.mark.parametrize("config", TINY, ids=lambda c: c.stem)
def test_tiny_configs_fit_a_few_steps(config, tmp_path):
    out = tmp_path / "run"
    result = run_mmlm(
        "fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(out), *AFTER_ANOTHER_RUN.get(config.stem, []),
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = out / "version_0"
    assert [p.name for p in out.iterdir()] == ["version_0"]
    assert (run / "config.yaml").is_file() and "val/" in (run / "metrics.csv").read_text()
    # the YAML's ModelCheckpoint saves every 100 steps; the end of the run (step 3) is saved all the same
    (path,) = (run / "checkpoints").glob("epoch=*-step=3.ckpt")
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 3
    # every task holds one mmlm model, heads included: the checkpoint loads without the task
    import mmlm

    model = mmlm.load_pretrained(path)
    trained = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert model.state_dict().keys() == trained.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


DIGITS = ROOT / "configs" / "align" / "clip-digits-tiny.yaml"
# 1437 training digits / batch 256 = 5 optimizer steps per epoch; 3 epochs
SHORT = ["--data.init_args.batch_size", "256", "--trainer.max_steps", "15", "--trainer.limit_val_batches", "0",
         "--trainer.logger", "false", "--seed_everything", "0"]  # fmt: skip
QUICK = ["--data.init_args.batch_size", "32", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip


def checkpoints(root: Path, every_n_steps: int | None = None) -> list[str]:
    """Runs in ``root`` with a ModelCheckpoint keeping every checkpoint: at each epoch end, or every n steps."""
    when = [f"--trainer.callbacks.every_n_train_steps={every_n_steps}"] if every_n_steps else \
        ["--trainer.callbacks.save_on_train_epoch_end=true"]
    return ["--trainer.default_root_dir", str(root),
            "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.save_top_k=-1", *when]  # fmt: skip


def final_weights(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    return state["global_step"], state["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("every_n_steps, kill_after", [(None, "epoch=0-step=5.ckpt"), (3, "epoch=1-step=6.ckpt")],
                         ids=["epoch-end", "mid-epoch"])  # fmt: skip
def test_killed_run_resumes_to_the_same_step_and_weights(tmp_path, every_n_steps, kill_after):
    ref, cut = tmp_path / "uninterrupted", tmp_path / "killed"
    saved = cut / "version_0" / "checkpoints"
    done = run_mmlm("fit", "--config", str(DIGITS), *SHORT, *checkpoints(ref, every_n_steps), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "mmlm.cli", "fit", "--config", str(DIGITS), *SHORT, *checkpoints(cut, every_n_steps)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (saved / kill_after).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (saved / kill_after).exists(), "the run never wrote the checkpoint to be killed after"
    time.sleep(0.5)  # let it train on a little past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (saved / "epoch=2-step=15.ckpt").exists(), "the run finished before it was killed"
    step_at_kill, _ = final_weights(saved / "last.ckpt")
    assert 5 <= step_at_kill < 15

    resumed = run_mmlm("fit", "--config", str(DIGITS), *SHORT, *checkpoints(cut, every_n_steps), "--ckpt_path", "last",
                       cwd=ROOT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {saved / 'last.ckpt'} at global step {step_at_kill}" in resumed.stdout
    assert sorted(p.name for p in cut.iterdir()) == ["version_0"]  # it continued the killed run's folder
    ref_step, ref_state = final_weights(ref / "version_0" / "checkpoints" / "epoch=2-step=15.ckpt")
    cut_step, cut_state = final_weights(saved / "epoch=2-step=15.ckpt")
    assert ref_step == cut_step == 15
    for name, value in ref_state.items():
        # equal weights: no optimizer step was repeated or skipped, and the data order is the same
        torch.testing.assert_close(cut_state[name], value, rtol=0, atol=0, msg=name)


def fit(root: Path, steps: int, *args: str):
    return lightning_cli(["fit", "--config", str(DIGITS), *QUICK, "--trainer.max_steps", str(steps),
                          "--trainer.default_root_dir", str(root), *args])  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Each file's bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_runs_get_their_own_folders_and_last_resumes_the_newest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    fit(tmp_path, 3)  # run A
    fit(tmp_path, 2)  # run B, same config and root
    a, b = tmp_path / "version_0", tmp_path / "version_1"
    assert final_weights(a / "checkpoints" / "last.ckpt")[0] == 3
    assert final_weights(b / "checkpoints" / "last.ckpt")[0] == 2
    before_a, before_b_config = snapshot(a), (b / "config.yaml").read_bytes()
    capsys.readouterr()

    fit(tmp_path, 4, "--ckpt_path", "last")  # continues B, the newest, from its own last.ckpt
    assert f"resuming from {b / 'checkpoints' / 'last.ckpt'} at global step 2" in capsys.readouterr().out
    assert final_weights(b / "checkpoints" / "last.ckpt")[0] == 4
    assert (b / "config.yaml").read_bytes() == before_b_config  # this command's config went to resume_1/
    assert (b / "resume_1" / "config.yaml").is_file()
    assert snapshot(a) == before_a  # A's files: same bytes, same modification times
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0", "version_1"]

    fit(tmp_path, 5, "--ckpt_path", str(a / "checkpoints" / "last.ckpt"))  # a particular run, by its file
    assert f"resuming from {a / 'checkpoints' / 'last.ckpt'} at global step 3" in capsys.readouterr().out
    assert final_weights(a / "checkpoints" / "last.ckpt")[0] == 5
    assert final_weights(b / "checkpoints" / "last.ckpt")[0] == 4


def test_ckpt_path_last_without_a_run_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(DIGITS), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
    assert exit_.value.code != 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"no run to resume in {tmp_path}" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_end_of_a_run_is_saved_when_max_steps_stops_it_between_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = fit(tmp_path, 5, "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.save_last=true", "--trainer.callbacks.every_n_train_steps=3",
              "--trainer.callbacks.save_top_k=-1")  # fmt: skip
    saved = tmp_path / "version_0" / "checkpoints"
    assert sorted(final_weights(p)[0] for p in saved.glob("epoch=*.ckpt")) == [3, 5]
    step, state = final_weights(saved / "last.ckpt")
    assert step == cli.trainer.global_step == 5
    for name, value in cli.model.state_dict().items():  # the weights the run ended with
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("limits, expected", [({"max_steps": 600}, "Epoch 27"), ({"max_epochs": 3}, "Epoch 27/2")])
def test_progress_bar_epoch_counter(limits, expected):
    import lightning as L

    from mmlm.callbacks import RunProgressBar

    bar = RunProgressBar()
    trainer = L.Trainer(**limits, callbacks=[bar], logger=False, enable_checkpointing=False)
    bar.setup(trainer, L.LightningModule(), "fit")
    assert bar._get_train_description(27).strip() == expected  # Lightning's own: "Epoch 27/-2" for max_steps


@pytest.mark.processes
@pytest.mark.slow
def test_fit_runs_with_ddp_on_two_cpu_processes(tmp_path):
    result = run_mmlm(
        "fit", "--config", str(DIGITS), "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "4", "--data.init_args.batch_size", "32", "--trainer.val_check_interval", "4",
        "--trainer.limit_val_batches", "2", "--trainer.logger", "false", *checkpoints(tmp_path), cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0"]  # both ranks wrote one run
    step, _ = final_weights(tmp_path / "version_0" / "checkpoints" / "last.ckpt")
    assert step == 4


@pytest.mark.slow  # a Lightning predict run: 2.6 s
def test_predict_writes_unit_embeddings_of_the_held_out_digits(tmp_path, monkeypatch, capsys):
    from sklearn.datasets import load_digits

    monkeypatch.chdir(ROOT)
    lightning_cli(["predict", "--config", str(DIGITS), "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.enable_progress_bar", "false"])  # fmt: skip
    path = tmp_path / "predict_1" / "predictions.pt"
    held_out = math.ceil(0.2 * len(load_digits().target))  # scikit-learn's train_test_split(test_size=0.2): 360
    assert f"wrote {path}: {held_out} samples" in capsys.readouterr().out
    out = torch.load(path, weights_only=True)
    assert out["image_embeds"].shape == out["text_embeds"].shape == (held_out, 32)
    assert out["image_id"].unique().numel() == held_out  # every held-out scan once
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(held_out))


@pytest.mark.parametrize("config, args, message", [
    ("pretrain/mlm-tiny.yaml", [], "LanguagePretraining has no predict_step"),
    ("align/clip-digits-tiny.yaml", ["--data.init_args.test_data", "null"], "no data to predict on"),
], ids=["no-predict-step", "no-test-data"])  # fmt: skip
def test_predict_with_nothing_to_predict_is_an_error(config, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=message):
        lightning_cli(["predict", "--config", str(ROOT / "configs" / config), *args,
                       "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])


@pytest.mark.parametrize("args, message", [
    (["--data.init_args.batch_size", "0"], "batch_size must be 1 or more, got 0"),
    (["--model.init_args.optimizer.init_args.lr", "-0.001"], "Invalid learning rate: -0.001"),
    (["--model.init_args.warmup_steps", "-5"], "warmup_steps must be 0 or more, got -5"),
], ids=["batch_size", "lr", "warmup_steps"])  # fmt: skip
def test_bad_training_settings_are_one_line_errors(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=message) as error:
        lightning_cli(["--config", str(DIGITS), *args, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert "\n" not in str(error.value)
