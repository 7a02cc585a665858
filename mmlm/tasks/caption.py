"""Captioning: train a CoCa with OpenCLIP's ``CoCaLoss`` (CLIP loss + weighted caption cross-entropy).

Everything else is ``ContrastiveAlignment``'s: the optimizer and schedule, tower locking, the temperature
clamp, and validation by retrieval recall and zero-shot accuracy (CoCa's contrastive side), to which the
validation caption loss is added. Captions themselves come from ``model.generate`` / ``mmlm caption``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable

from mmlm.losses import CoCaLoss
from mmlm.models import CoCa
from mmlm.tasks.base import adamw
from mmlm.tasks.contrastive import ContrastiveAlignment


class Captioning(ContrastiveAlignment):
    """Train a CoCa.

    Args:
        model: a CoCa: a preset name (``coca-tiny``, ``coca-vit-b-32``), an mmlm folder, a ``mmlm fit`` .ckpt,
            or an OpenCLIP CoCa checkpoint.
        model_overrides: preset field overrides, e.g. ``{decoder: {depth: 4}}``.
        caption_loss_weight: weight of the caption cross-entropy (OpenCLIP's ``--coca-caption-loss-weight``, 2).
        clip_loss_weight: weight of the CLIP loss (OpenCLIP's ``--coca-contrastive-loss-weight``, 1).
        lock_image: freeze the image tower, keeping ``lock_image_unlocked_layers`` top blocks trainable.
        lock_text: freeze the text tower, keeping ``lock_text_unlocked_layers`` top blocks trainable.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    model_type = CoCa

    def __init__(
        self,
        model: str = "coca-tiny",
        model_overrides: dict[str, Any] | None = None,
        caption_loss_weight: float = 2.0,
        clip_loss_weight: float = 1.0,
        lock_image: bool = False,
        lock_image_unlocked_layers: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(
            model, model_overrides, loss="clip", lock_image=lock_image, lock_image_unlocked_layers=lock_image_unlocked_layers,
            lock_text=lock_text, lock_text_unlocked_layers=lock_text_unlocked_layers, optimizer=optimizer,
            warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["optimizer"])
        self.coca_loss = CoCaLoss(caption_loss_weight, clip_loss_weight, pad_id=self.model.cfg.text.pad_token_id)

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        out = self(batch)
        total, contrastive, captioning = self.coca_loss(
            out.image_embeds, out.text_embeds, out.logits, out.labels, out.logit_scale, out.logit_bias
        )
        return total, contrastive, captioning, out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, contrastive, captioning, out = self._losses(batch)
        self.log("train/loss", total, prog_bar=True)
        self.log("train/clip_loss", contrastive)
        self.log("train/caption_loss", captioning, prog_bar=True)
        self.log("train/logit_scale", out.logit_scale.detach())
        return total

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, contrastive, captioning, out = self._losses(batch)
        self.log("val/loss", total, sync_dist=True)
        self.log("val/caption_loss", captioning, sync_dist=True)
        self._val["image"].append(out.image_embeds)
        self._val["text"].append(out.text_embeds)
        self._val["image_id"].append(batch["image_id"])
        if "label" in batch:
            self._val["label"].append(batch["label"])
