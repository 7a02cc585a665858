"""Distillation: a student CLIP learns from a frozen teacher CLIP on the same image-text batches.

The objective is OpenCLIP's ``DistillClipLoss`` (``mmlm.losses.distill_clip_loss``): the student's
own CLIP loss plus the cross-entropy of its logits against the teacher's softmax, both directions,
and optionally a feature term pulling the student's embeddings onto the teacher's (same ``embed_dim``)::

    batch -> student (trained) -> logits_s --+-> contrastive (labels on the diagonal)
          -> teacher (frozen)  -> logits_t --+-> distill     (softmax(logits_t) as soft labels)

Validation, checkpoints and ``mmlm.load_pretrained(ckpt)`` see the student only: it is the task's ``model``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable

from mmlm.errors import UsageTypeError
from mmlm.factory import resolve
from mmlm.losses import distill_clip_loss, feature_distill_loss
from mmlm.models import CLIP
from mmlm.tasks.base import adamw
from mmlm.tasks.contrastive import ContrastiveAlignment


class ClipDistillation(ContrastiveAlignment):
    """Train a student CLIP from a teacher CLIP.

    Args:
        teacher: the teacher CLIP: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint
            ``mmlm.load_pretrained`` reads; frozen and run in eval mode. It reads the same batches, so it
            needs the student's tokenizer (vocabulary).
        model: the student, named as ``teacher`` is; usually a preset made smaller by ``model_overrides``.
        model_overrides: preset field overrides of the student, e.g. ``{vision: {width: 32, depth: 1}}``.
        contrastive_weight: weight of the student's own CLIP loss.
        distill_weight: weight of the logit distillation term (OpenCLIP weighs both terms 1).
        feature_weight: weight of ``1 - cosine`` between student and teacher embeddings; needs equal ``embed_dim``.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    def __init__(
        self,
        teacher: str,
        model: str = "clip-tiny",
        model_overrides: dict[str, Any] | None = None,
        contrastive_weight: float = 1.0,
        distill_weight: float = 1.0,
        feature_weight: float = 0.0,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(model, model_overrides, optimizer=optimizer, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio)  # fmt: skip
        self.save_hyperparameters(ignore=["optimizer"])
        if min(contrastive_weight, distill_weight, feature_weight) < 0:
            raise ValueError("contrastive_weight, distill_weight and feature_weight must be 0 or more")
        self.teacher: CLIP = resolve(teacher)
        if not isinstance(self.teacher, CLIP):
            raise UsageTypeError(f"teacher {teacher!r} is not a CLIP model")
        self.teacher.eval().requires_grad_(False)
        student, taught = self.model.cfg, self.teacher.cfg
        if student.text.vocab_size != taught.text.vocab_size:
            raise ValueError(f"teacher and student read the same token ids: vocab_size {taught.text.vocab_size} "
                             f"!= {student.text.vocab_size}")  # fmt: skip
        if feature_weight and student.embed_dim != taught.embed_dim:
            raise ValueError(f"feature_weight needs equal embed_dim, got student {student.embed_dim} and "
                             f"teacher {taught.embed_dim}")  # fmt: skip
        self.contrastive_weight = contrastive_weight
        self.distill_weight = distill_weight
        self.feature_weight = feature_weight

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, no patch dropout
        return self

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        with torch.no_grad():
            taught = self.teacher(batch["image"], batch["input_ids"], batch["attention_mask"])
        contrastive, distill = distill_clip_loss(
            out.image_embeds, out.text_embeds, out.logit_scale, taught.image_embeds, taught.text_embeds, taught.logit_scale
        )
        loss = self.contrastive_weight * contrastive + self.distill_weight * distill
        if self.feature_weight:
            features = (feature_distill_loss(out.image_embeds, taught.image_embeds)
                        + feature_distill_loss(out.text_embeds, taught.text_embeds)) / 2  # fmt: skip
            loss = loss + self.feature_weight * features
            self.log("train/feature_loss", features)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/contrastive_loss", contrastive)
        self.log("train/distill_loss", distill)
        self.log("train/logit_scale", out.logit_scale.detach())
        return loss
