"""Callbacks every ``mmlm fit|validate|test|predict`` command gets (``mmlm.runs.RunCLI`` adds them)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, RichProgressBar
from lightning_utilities.core.apply_func import apply_to_collection


class RestoreRNG(Callback):
    """Save the torch / CUDA / numpy / python RNG states with each checkpoint and restore them on resume.

    Lightning restores weights, optimizer and loop counters but not the RNGs, so a resumed
    run would shuffle and augment differently from the run it continues. With this, a run
    killed and resumed from an epoch-end checkpoint ends with the same weights as one that
    was never interrupted.
    """

    def state_dict(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # as a tensor and plain numbers: Lightning reloads checkpoints with weights_only=True
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state_dict["python"])


def _numpy_state_to_torch(state: tuple) -> tuple:
    kind, keys, pos, has_gauss, gauss = state
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


class SaveFinalState(Callback):
    """Save every ModelCheckpoint's checkpoint and ``last.ckpt`` at the step training ended on.

    ModelCheckpoint saves on its own schedule only: a run stopped by ``max_steps: 150`` with
    ``every_n_train_steps: 100`` would keep ``last.ckpt`` at step 100 and lose its last 50 steps.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for checkpoint in trainer.checkpoint_callbacks:
            # the same calls ModelCheckpoint makes on its schedule; skipped when it saved this step already
            if not isinstance(checkpoint, ModelCheckpoint) or checkpoint._should_skip_saving_checkpoint(trainer):
                continue
            metrics = checkpoint._monitor_candidates(trainer)
            if checkpoint.monitor is None:  # a monitored top-k would rank this step by an older validation
                checkpoint._save_topk_checkpoint(trainer, metrics)
            checkpoint._save_last_checkpoint(trainer, metrics)


class ReportResume(Callback):
    """Print the checkpoint a command starts from and the global step it was saved at."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            action = "resuming from" if trainer.state.fn == "fit" else f"{trainer.state.fn.value}: weights of"
            print(f"{action} {trainer.ckpt_path} at global step {checkpoint['global_step']}")


class RunProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without ``Epoch 27/-2`` when ``max_steps`` ends the run.

    With ``max_steps`` and no ``max_epochs`` the trainer's ``max_epochs`` is -1 (no limit), which
    RichProgressBar prints as ``/-2``; then the description is ``Epoch 27`` as TQDMProgressBar's.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return description.replace(f"/{self.trainer.max_epochs - 1}", "", 1)
        return description


class PredictionWriter(BasePredictionWriter):
    """Concatenate the predictions of every batch into ``folder/predictions.pt`` (one file per rank under DDP).

    Each field (``image_embeds``, ``probs``, ...) becomes one tensor with a row per sample, or
    one list when the task predicts text; ``torch.load(path)`` reads it back.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__(write_interval="batch")
        self.folder = Path(folder)
        self.batches: list[Any] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder = Path(trainer.strategy.broadcast(str(self.folder)))  # every rank writes next to rank 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.batches = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.batches.append(apply_to_collection(prediction, torch.Tensor, lambda t: t.detach().cpu()))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.batches:  # this rank had nothing to predict; the command reports it
            return
        predictions = concat(self.batches)
        name = "predictions.pt" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.pt"
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(predictions, self.folder / name)
        fields = predictions.items() if isinstance(predictions, dict) else [("predictions", predictions)]
        shapes = ", ".join(f"{k} {list(v.shape) if isinstance(v, torch.Tensor) else len(v)}" for k, v in fields)
        print(f"wrote {self.folder / name}: {len(next(iter(fields))[1])} samples ({shapes})")


def concat(batches: list[Any]) -> Any:
    """Per-batch predictions -> one: tensors joined along the batch axis, lists chained, dicts per key."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([b.reshape(-1, *b.shape[1:]) for b in batches])  # a 0-d tensor counts as one row
    if isinstance(first, dict):
        return {key: concat([b[key] for b in batches]) for key in first}
    if isinstance(first, (list, tuple)):
        return [item for b in batches for item in b]
    raise TypeError(f"predict_step returned a {type(first).__name__}: return tensors, lists or a dict of them")
