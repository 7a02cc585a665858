"""What every mmlm LightningModule shares: the optimizer, the LR schedule and what a checkpoint carries (models:
``mmlm.factory.resolve``).

The schedule is linear warmup then cosine decay sized from ``trainer.max_steps``.
Reading ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` would drop
the saved dataloader state on resume (Lightning #20550), so runs must set max_steps.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from mmlm.config import to_dict
from mmlm.data.tokenizers import is_clip_name


def adamw(params: Iterable[Any], lr: float = 5e-4, weight_decay: float = 0.1, betas=(0.9, 0.98), eps: float = 1e-6):
    """AdamW with CLIP's betas and eps; the default optimizer of every task."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: 0 -> 1 linearly over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_optimizer(optimizer: OptimizerCallable) -> None:
    """Build the optimizer once on a stand-in parameter, so that torch's own checks of lr, betas, eps and
    weight_decay fail when the task is configured, not minutes later when training starts."""
    try:
        optimizer([nn.Parameter(torch.zeros(1))])
    except ValueError as e:  # torch: "Invalid learning rate: -0.001"
        raise ValueError(f"optimizer: {e} (lr, eps and weight_decay must be >= 0, betas in [0, 1))") from None


class Task(L.LightningModule):
    """Base class: subclasses set ``self.model`` and implement the steps.

    ``optimizer`` is any callable taking parameter groups; in YAML a ``class_path`` such as
    ``torch.optim.AdamW`` with ``init_args``.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be 0 or more, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be between 0 and 1, got {min_lr_ratio}")
        check_optimizer(optimizer)
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def param_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only: biases, norms, scales and tokens (ndim < 2) are not decayed."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the model's config, so ``mmlm.load_pretrained(ckpt)`` rebuilds it without the task, and the
        tokenizer the data module tokenized with, so every command that takes the .ckpt (``mmlm.factory``)
        uses that vocabulary wherever the checkpoint is moved. The CLIP BPE is not stored: it is the
        default for its vocabulary size."""
        model = getattr(self, "model", None)
        if model is not None and hasattr(model, "cfg"):
            checkpoint["mmlm_config"] = to_dict(model.cfg)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        name = getattr(datamodule, "tokenizer_name", None)
        if name is not None and not is_clip_name(str(name)):
            from mmlm.factory import CKPT_TOKENIZER, tokenizer_files

            checkpoint[CKPT_TOKENIZER] = tokenizer_files(datamodule.tokenizer)

    def on_train_start(self) -> None:
        """Training mode for the whole task: a model read from a checkpoint comes in eval mode, and
        Lightning keeps each module's mode as it finds it. Tasks that keep a locked part in eval
        mode do so in their ``train`` override."""
        self.train()

    def on_fit_end(self) -> None:
        """Print the last validation metrics, so a finished run ends with its result."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics and self.trainer.is_global_zero:
            width = max(map(len, metrics))
            print(f"\nvalidation after {self.trainer.global_step} steps:")
            for name, value in sorted(metrics.items()):
                print(f"  {name:<{width}}  {value:.4f}")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.param_groups())
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 0:
            raise ValueError("set trainer.max_steps: the warmup + cosine schedule is sized from it")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, max_steps, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
