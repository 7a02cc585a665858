"""Contrastive image-text alignment (CLIP / SigLIP) as a LightningModule.

Training: the loss is computed on this rank's rows against every rank's columns
(``mmlm.losses``), so N GPUs give the gradient of one N-times-larger batch.
``micro_batches > 1`` splits each batch into chunks whose activations are never held
together, yet every chunk still sees the negatives of the whole batch:

    1. encode each chunk under activation checkpointing (outputs kept, activations not)
    2. loss on the detached features of the whole batch -> d loss / d features
    3. backward of  loss + sum_j <features_j, d loss / d features_j>  re-runs one chunk at a time

Step 3's gradient equals the full batch's (logit scale included); checkpointing
replays the RNG, so dropout matches too. Memory is one chunk's activations.

Validation: image-text retrieval recall and, when the data module offers class names
and prompt templates with labelled images, zero-shot accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch.utils.checkpoint import checkpoint

from mmlm.errors import UsageTypeError
from mmlm.eval.retrieval import retrieval_metrics
from mmlm.eval.zeroshot import build_classifier, classification_metrics
from mmlm.factory import resolve
from mmlm.losses import ContrastiveLoss
from mmlm.models import CLIP, clip_with_tower
from mmlm.models.clip import CLIPOutput
from mmlm.tasks.base import Task, adamw


def lock_tower(tower: torch.nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze a tower except its top ``unlocked_layers`` blocks (and its final norm if any are unlocked)."""
    for p in tower.parameters():
        p.requires_grad_(False)
    if unlocked_layers > 0:
        for block in list(tower.blocks)[-unlocked_layers:]:
            block.requires_grad_(True)
        tower.norm.requires_grad_(True)


class ContrastiveAlignment(Task):
    """Train a CLIP with the CLIP or SigLIP loss.

    Args:
        model: a CLIP: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint
            ``mmlm.load_pretrained`` reads.
        model_overrides: preset field overrides, e.g. ``{share: attention, vision: {patch_dropout: 0.5}}``.
        text_tower: a model named as ``model`` is (e.g. a sentence-transformers folder) whose text encoder
            replaces the CLIP's.
        image_tower: a model named as ``model`` is (e.g. a timm ViT) whose vision encoder replaces the CLIP's.
        loss: ``clip`` (softmax InfoNCE) or ``siglip`` (sigmoid).
        lock_image: freeze the image tower (LiT), keeping ``lock_image_unlocked_layers`` top blocks trainable.
        lock_text: freeze the text tower, keeping ``lock_text_unlocked_layers`` top blocks trainable.
        micro_batches: split each batch into this many chunks with the whole batch's negatives.
        optimizer: optimizer factory taking parameter groups.
        warmup_steps: linear LR warmup steps before the cosine decay.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    model_type: type[torch.nn.Module] = CLIP  # what ``model`` must be

    def __init__(
        self,
        model: str = "clip-tiny",
        model_overrides: dict[str, Any] | None = None,
        text_tower: str | None = None,
        image_tower: str | None = None,
        loss: Literal["clip", "siglip"] = "clip",
        lock_image: bool = False,
        lock_image_unlocked_layers: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        micro_batches: int = 1,
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(optimizer, warmup_steps, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.model: CLIP = resolve(model, overrides=model_overrides)
        if not isinstance(self.model, self.model_type):
            raise UsageTypeError(f"{model!r} is not a {self.model_type.__name__} model")
        for path, modality in ((text_tower, "text"), (image_tower, "image")):
            if path is not None:
                self._replace_tower(modality, path)
        if (lock_image or lock_text) and self.model.cfg.share != "none":
            raise ValueError("locking one tower needs share='none': shared blocks belong to both towers")
        self.locked = []
        if lock_image:
            lock_tower(self.model.visual, lock_image_unlocked_layers)
            self.locked.append((self.model.visual, lock_image_unlocked_layers))
        if lock_text:
            lock_tower(self.model.text, lock_text_unlocked_layers)
            self.locked.append((self.model.text, lock_text_unlocked_layers))
        self.loss_fn = ContrastiveLoss(loss)
        self.micro_batches = micro_batches
        self._val: dict[str, list[torch.Tensor]] = {}

    def _replace_tower(self, modality: str, spec: str | Path) -> None:
        """Put the ``modality`` tower of the model ``spec`` names (itself a tower, a text model
        with heads, or a CLIP) into the CLIP; the result shares nothing and owns every weight."""
        try:
            new = resolve(spec, part=modality)
        except UsageTypeError as e:
            raise UsageTypeError(f"{modality}_tower {spec}: {e}") from None
        self.model = clip_with_tower(self.model, modality, new)

    def train(self, mode: bool = True):
        super().train(mode)
        for tower, unlocked in self.locked:
            if unlocked == 0:
                tower.eval()  # a fully locked tower keeps dropout off, as in LiT
        return self

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict[str, torch.Tensor]) -> CLIPOutput:
        """The CLIP's ``CLIPOutput`` for the batch's images and texts."""
        return self.model(batch["image"], batch["input_ids"], batch["attention_mask"])

    def features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings of the batch."""
        out = self(batch)
        return out.image_embeds, out.text_embeds

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.micro_batches <= 1:
            out = self(batch)
            scale = out.logit_scale
            loss = objective = self.loss_fn(out.image_embeds, out.text_embeds, scale, out.logit_bias)
        else:
            # the scale is taken outside the checkpointed chunks: its gradient must not replay one
            scale = self.model.scale()
            loss, objective = self._chunked_loss(batch, scale, self.model.logit_bias)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale.detach())
        return objective

    def _chunked_loss(self, batch, scale, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, objective): the objective's gradient is the loss's, at one chunk's memory."""
        keys = ("image", "input_ids", "attention_mask")
        chunks = [dict(zip(keys, values)) for values in zip(*(batch[k].chunk(self.micro_batches) for k in keys))]
        parts = [checkpoint(self.features, chunk, use_reentrant=False) for chunk in chunks]
        images = torch.cat([p[0].detach() for p in parts]).requires_grad_()
        texts = torch.cat([p[1].detach() for p in parts]).requires_grad_()
        loss = self.loss_fn(images, texts, scale, bias)
        d_images, d_texts = torch.autograd.grad(loss, [images, texts], retain_graph=True)
        sizes = [p[0].shape[0] for p in parts]
        objective = loss
        for (img, txt), g_img, g_txt in zip(parts, d_images.split(sizes), d_texts.split(sizes)):
            objective = objective + (img * g_img).sum() + (txt * g_txt).sum()
        return loss, objective

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # CLIP clamps the learned temperature after every step
            self.model.logit_scale.clamp_(0, self.model.cfg.max_logit_scale)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """L2-normalised embeddings of the batch's images and texts (``mmlm predict``)."""
        images, texts = self.features(batch)
        return {"image_embeds": images, "text_embeds": texts, "image_id": batch["image_id"]}

    # ---------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val = {"image": [], "text": [], "image_id": [], "label": []}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)
        images, texts = out.image_embeds, out.text_embeds
        self.log("val/loss", self.loss_fn(images, texts, out.logit_scale, out.logit_bias), sync_dist=True)
        self._val["image"].append(images)
        self._val["text"].append(texts)
        self._val["image_id"].append(batch["image_id"])
        if "label" in batch:
            self._val["label"].append(batch["label"])

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("image"):
            return
        val = {k: self._gather(torch.cat(v)) for k, v in self._val.items() if v}
        for name, value in self.evaluate(val).items():
            self.log(f"val/{name}", value)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size == 1:
            return x
        return self.all_gather(x).flatten(0, 1)  # (world, N, ...) -> (world * N, ...)

    def evaluate(self, val: dict[str, torch.Tensor]) -> dict[str, float]:
        """Retrieval over unique images (several captions each) and zero-shot accuracy if possible."""
        unique_ids, first = _first_occurrence(val["image_id"])
        text_to_image = torch.searchsorted(unique_ids, val["image_id"])
        metrics = retrieval_metrics(val["image"][first], val["text"], text_to_image, ks=(1, 5))
        metrics = {k: v for k, v in metrics.items() if "recall" in k}
        dm = getattr(self._trainer, "datamodule", None)
        classnames, templates = getattr(dm, "classnames", None), getattr(dm, "templates", None)
        if "label" in val and classnames and templates:
            weights = build_classifier(self.model, dm.tokenizer, classnames, templates)
            logits = val["image"][first] @ weights
            metrics.update({f"zeroshot_{k}": v for k, v in classification_metrics(logits, val["label"][first]).items()})
        return metrics


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and the index of each one's first occurrence in ``ids``."""
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    first = torch.full((len(unique),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
    return unique, first
