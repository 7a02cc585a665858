"""Contrastive losses that give the same gradients on N ranks as on one big batch.

Each rank computes only its own rows ("local loss") against the columns of every
rank, gathered *with* gradients; labels are offset by ``rank * B``. Under DDP's
gradient averaging this is exactly the gradient of the full-batch loss: the
all-gather's backward sums what every rank's loss sends to a rank's features.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmlm.distributed import world


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and keeps this rank's slice.

    all_reduce works on every backend (gloo has no reduce_scatter), and one collective per
    direction keeps the ranks' collective order identical.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, size = dist.get_rank(), dist.get_world_size()
        return grad.chunk(size, dim=0)[rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph; (world * B, ...)."""
    return x if world()[1] == 1 else _GatherWithGrad.apply(x)


def gather_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather two (B, D) feature sets in one collective."""
    if world()[1] == 1:
        return a, b
    both = gather_with_grad(torch.cat([a, b], dim=-1))
    return both[:, : a.shape[-1]], both[:, a.shape[-1] :]


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP over the global batch: mean of image->text and text->image CE.

    Features are this rank's (B, D), L2-normalised; ``logit_scale`` is already exp()'d.
    """
    rank, _ = world()
    all_images, all_texts = gather_pair(image_features, text_features)
    logits_per_image = logit_scale * image_features @ all_texts.T  # (B, world * B)
    logits_per_text = logit_scale * text_features @ all_images.T
    if logit_bias is not None:
        logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
    labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid loss of SigLIP: every image-text pair is a binary problem, +1 on the diagonal.

    Summed over this rank's rows and all ranks' columns, divided by the local batch size,
    as in big_vision and OpenCLIP. Gathering the texts (one all-gather) replaces
    OpenCLIP's ring exchange; the gradients are the same.
    """
    rank, _ = world()
    B = image_features.shape[0]
    all_texts = gather_with_grad(text_features)
    logits = logit_scale * image_features @ all_texts.T  # (B, world * B)
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = -torch.ones_like(logits)
    labels[:, rank * B : (rank + 1) * B] += 2 * torch.eye(B, device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / B


def distill_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_image_features: torch.Tensor,
    teacher_text_features: torch.Tensor,
    teacher_logit_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(contrastive, distill) of OpenCLIP's ``DistillClipLoss``: the student's CLIP loss, and the
    cross-entropy of the student's logits against the teacher's softmax, image->text and text->image, averaged.

    Features are this rank's (B, D), L2-normalised (teacher and student may differ in D); the scales
    are exp()'d. Columns come from every rank, as in ``clip_loss``.
    """
    rank, _ = world()
    all_images, all_texts = gather_pair(image_features, text_features)
    teacher_images, teacher_texts = gather_pair(teacher_image_features, teacher_text_features)
    logits_per_image = logit_scale * image_features @ all_texts.T  # (B, world * B)
    logits_per_text = logit_scale * text_features @ all_images.T
    teacher_per_image = teacher_logit_scale * teacher_image_features @ teacher_texts.T
    teacher_per_text = teacher_logit_scale * teacher_text_features @ teacher_images.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    contrastive = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    # cross_entropy with probabilities as targets: -(p_teacher * log_softmax(student)).sum(1).mean()
    distill = (
        F.cross_entropy(logits_per_image, teacher_per_image.softmax(1))
        + F.cross_entropy(logits_per_text, teacher_per_text.softmax(1))
    ) / 2
    return contrastive, distill


def feature_distill_loss(features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine between the student's and the teacher's embeddings of the same inputs, (B, D) each."""
    return 1 - F.cosine_similarity(features, teacher_features, dim=-1).mean()


LOSSES = {"clip": clip_loss, "siglip": siglip_loss}


class ContrastiveLoss(nn.Module):
    """``clip`` or ``siglip`` loss by name; a module so tasks can hold and swap it."""

    def __init__(self, kind: str = "clip"):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown contrastive loss {kind!r}; choose from {sorted(LOSSES)}")
        self.kind = kind

    def forward(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        return LOSSES[self.kind](image_features, text_features, logit_scale, logit_bias)



def caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int | None = 0) -> torch.Tensor:
    """Next-token cross-entropy of a caption decoder: (B, T, vocab) logits against (B, T) labels.

    Labels of -100 are skipped, and so is ``pad_id`` as in OpenCLIP's ``CoCaLoss`` (its
    ``CrossEntropyLoss(ignore_index=pad_id)``: with CLIP's BPE that also skips the real token 0, "!").
    """
    if pad_id is not None:
        labels = labels.masked_fill(labels == pad_id, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class CoCaLoss(nn.Module):
    """OpenCLIP's ``CoCaLoss``: ``clip_weight`` * CLIP loss + ``caption_weight`` * caption loss; its training
    defaults are 1 and 2. ``forward`` returns (total, clip part, caption part), the parts already weighted."""

    def __init__(self, caption_weight: float = 2.0, clip_weight: float = 1.0, pad_id: int | None = 0):
        super().__init__()
        self.caption_weight, self.clip_weight, self.pad_id = caption_weight, clip_weight, pad_id

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        contrastive = self.clip_weight * clip_loss(image_features, text_features, logit_scale, logit_bias)
        captioning = self.caption_weight * caption_loss(logits, labels, self.pad_id)
        return contrastive + captioning, contrastive, captioning
