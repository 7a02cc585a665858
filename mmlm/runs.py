"""Where ``mmlm fit|validate|test|predict`` write, and which run ``--ckpt_path last`` continues.

Every path a run writes derives from one root, the config's ``trainer.default_root_dir``
(Lightning's ``lightning_logs`` when unset)::

    runs/NAME/                        trainer.default_root_dir
      version_0/                      one `mmlm fit` (numbered as Lightning's loggers number versions)
        config.yaml                   the whole config of that command
        metrics.csv  hparams.yaml     CSVLogger
        tb/                           TensorBoardLogger
        checkpoints/last.ckpt  ...    every ModelCheckpoint
        resume_1/                     logs and config.yaml of `--ckpt_path last`, which continues version_0
        predict_1/predictions.pt      `mmlm predict --ckpt_path runs/NAME/version_0/checkpoints/last.ckpt`
      version_1/                      the next `mmlm fit`
      predict_1/                      a command given no checkpoint of a run

A command never writes into another command's folder, so nothing is overwritten: a resumed
run keeps writing checkpoints into its own ``checkpoints/`` and its logs go to a fresh
``resume_N/`` (Lightning's CSVLogger deletes a ``metrics.csv`` it finds in its folder).
"""

from __future__ import annotations

import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mmlm.callbacks import PredictionWriter, ReportResume, RestoreRNG, RunProgressBar, SaveFinalState

DEFAULT_ROOT = Path("lightning_logs")
VERSION = "version_"
LAST = "last"  # --ckpt_path last: the newest run's checkpoints/last.ckpt


@dataclass(frozen=True)
class RunFolders:
    """Where one command writes."""

    logs: Path  # its config.yaml, logs and outputs (predictions)
    checkpoints: Path  # where its ModelCheckpoints write
    ckpt_path: Path | None  # the checkpoint it starts from


def numbered(parent: Path, prefix: str) -> dict[int, Path]:
    """The folders ``parent/{prefix}N`` by N."""
    if not parent.is_dir():
        return {}
    matches = (re.fullmatch(re.escape(prefix) + r"(\d+)", p.name) for p in parent.iterdir() if p.is_dir())
    return {int(m.group(1)): parent / m.group(0) for m in matches if m}


def next_free(parent: Path, prefix: str, first: int) -> Path:
    """``parent/{prefix}N`` with N one more than the largest taken (Lightning's loggers' rule), else ``first``."""
    taken = numbered(parent, prefix)
    return parent / f"{prefix}{max(taken) + 1 if taken else first}"


def resolve_ckpt_path(root: Path, ckpt_path: str | None) -> Path | None:
    """``last`` -> the newest run's ``checkpoints/last.ckpt``; any other value must be a checkpoint file."""
    if ckpt_path is None:
        return None
    if ckpt_path != LAST:
        path = Path(ckpt_path)
        if not path.is_file():
            raise ValueError(f"--ckpt_path {ckpt_path}: no such checkpoint file (give a .ckpt file or '{LAST}')")
        check_checkpoint_file(path)
        return path
    runs = numbered(root, VERSION)
    if not runs:
        raise ValueError(f"--ckpt_path last: no run to resume in {root} (no {VERSION}N folder); "
                         "start one without --ckpt_path")  # fmt: skip
    newest = runs[max(runs)]
    last = newest / "checkpoints" / "last.ckpt"
    if not last.is_file():  # never an older run's file in its place: that is not what "last" says
        raise ValueError(f"--ckpt_path last: the newest run, {newest}, saved no checkpoints/last.ckpt; "
                         "give the checkpoint file of the run to continue")  # fmt: skip
    return last


def check_checkpoint_file(path: Path) -> None:
    """Refuse, before the model is built, a file ``torch.load`` would fail on at its first bytes: an empty
    file, a cut-short zip archive (``torch.save``'s format), or neither a zip nor a pickle (the legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"--ckpt_path {path}: the file is empty (0 bytes), not a checkpoint")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise ValueError(f"--ckpt_path {path}: not a complete checkpoint (a zip archive cut short)")
    if not head.startswith((b"PK", b"\x80")):
        raise ValueError(f"--ckpt_path {path}: not a PyTorch checkpoint (neither torch.save's zip nor a pickle)")


def run_of(root: Path, ckpt: Path | None) -> Path | None:
    """The ``root/version_N`` folder whose ``checkpoints/`` holds ``ckpt``, if any."""
    if ckpt is None:
        return None
    folder = ckpt.resolve().parent
    run = folder.parent
    if folder.name == "checkpoints" and run.parent == root.resolve() and re.fullmatch(VERSION + r"\d+", run.name):
        return root / run.name
    return None


def plan(root: Path, command: str, ckpt_path: str | None) -> RunFolders:
    """The folders of ``command`` (``fit``, ``validate``, ``test`` or ``predict``) in the run root ``root``.

    ``fit`` from scratch, or from a checkpoint outside this root, starts the next ``version_N``;
    ``fit`` from a checkpoint of ``root/version_K`` continues that run. The other commands write
    next to the run their checkpoint comes from (``root`` itself without one).
    """
    start = resolve_ckpt_path(root, ckpt_path)
    run = run_of(root, start)
    if command == "fit" and run is None:
        new = next_free(root, VERSION, first=0)
        return RunFolders(new, new / "checkpoints", start)
    parent = run or root
    logs = next_free(parent, "resume_" if command == "fit" else f"{command}_", first=1)
    return RunFolders(logs, (run or logs) / "checkpoints", start)


def run_loggers(folder: Path) -> list[Logger]:
    """metrics.csv in ``folder`` and TensorBoard events in ``folder/tb`` (tensorboardX is a dependency)."""
    return [CSVLogger(folder, name="", version=""), TensorBoardLogger(folder, name="", version="", sub_dir="tb")]


class SaveRunConfig(SaveConfigCallback):
    """``config.yaml`` in the command's own folder; refuses to replace one that exists.

    Lightning's default writes it into the log dir, which is the shared root when logging is off.
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, folder: Path, **kwargs: Any) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)
        self.folder = Path(folder)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, self.folder / self.config_filename, skip_none=False, overwrite=False,
                         multifile=self.multifile)  # fmt: skip


class RunCLI(LightningCLI):
    """LightningCLI over every mmlm task and data module, writing each command into its own folder."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        import mmlm.data  # noqa: F401  (registers the data modules as subclasses)
        import mmlm.tasks  # noqa: F401

        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # tasks build their own optimizer and warmup + cosine schedule
            save_config_callback=SaveRunConfig,
            trainer_defaults={"callbacks": [RestoreRNG(), SaveFinalState(), ReportResume()]},
            parser_kwargs={"exit_on_error": False},  # a refused value is raised: `mmlm.cli` prints it as one line
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then choose the folders and turn ``--ckpt_path last`` into the newest run's file.

        ``last`` is resolved here, before LightningCLI reads a checkpoint's hyper-parameters,
        so that it behaves exactly as the path it stands for. (``mmlm.cli.main`` passes
        ``sys.argv`` itself, so Lightning's warning against giving both does not apply.)
        """
        self.config = parser.parse_args(args)
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        root = Path(config.trainer.default_root_dir or DEFAULT_ROOT)
        self.folders = plan(root, command or "fit", config.get("ckpt_path"))
        if self.folders.ckpt_path is not None:
            config.ckpt_path = str(self.folders.ckpt_path)
            # expected when a run continues in its own folder
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        self.save_config_kwargs["folder"] = self.folders.logs
        if command and rank_zero_only.rank == 0:
            print(self._describe(command))

    def _describe(self, command: str) -> str:
        run, logs = self.folders.checkpoints.parent, self.folders.logs
        if command == "fit" and run != logs:
            return f"mmlm fit: continuing the run {run} (logs and config of this command in {logs})"
        return f"mmlm {command}: writing to {logs}"

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:
            # jsonargparse wraps what a task or data module raises (a negative warmup_steps) in a
            # many-line listing of every type it tried: give the user the task's own message
            if isinstance(e.__cause__, Exception):
                raise e.__cause__ from None
            raise

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, with the run's loggers, progress bar, prediction writer and checkpoint folder."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and _RICH_AVAILABLE and \
                not any(isinstance(c, ProgressBar) for c in callbacks):  # fmt: skip
            callbacks.append(RunProgressBar())
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(self.folders.logs))
        kwargs["callbacks"] = callbacks
        if config.get("logger") in (None, True):  # Lightning's default logger; an explicit choice is kept
            kwargs["logger"] = run_loggers(self.folders.logs)
        trainer = super().instantiate_trainer(**kwargs)
        for checkpoint in trainer.checkpoint_callbacks:
            if not isinstance(checkpoint, ModelCheckpoint):
                continue
            if checkpoint.dirpath is not None:
                raise ValueError(
                    f"ModelCheckpoint dirpath={checkpoint.dirpath}: mmlm writes checkpoints into each run's own "
                    f"folder, ROOT/version_N/checkpoints; set --trainer.default_root_dir ROOT instead"
                )
            # resolved, as ModelCheckpoint resolves its own: on resume it restores its state only
            # when the folder equals the one saved in the checkpoint
            checkpoint.dirpath = str(self.folders.checkpoints.resolve())
        return trainer

    def before_predict(self) -> None:
        if not predicts(type(self.model)):
            import mmlm.tasks

            tasks = [name for name in mmlm.tasks.__all__ if predicts(getattr(mmlm.tasks, name))]
            raise ValueError(f"{type(self.model).__name__} has no predict_step: mmlm predict runs {', '.join(tasks)}")

    def after_predict(self) -> None:
        if not sum(self.trainer.num_predict_batches):
            data = type(self.datamodule).__name__
            raise ValueError(f"no data to predict on ({data} gave no batch): set --data.init_args.test_data")


def predicts(task: Any) -> bool:
    """Whether a LightningModule class has its own ``predict_step`` (Lightning's default calls ``forward``)."""
    return isinstance(task, type) and issubclass(task, L.LightningModule) and \
        task.predict_step is not L.LightningModule.predict_step  # fmt: skip
