"""Captioning: OpenCLIP's CoCaLoss reproduced on the outputs of an OpenCLIP CoCa (its own labels, padding and
weights), and the Lightning task's steps on a tiny CoCa with a small vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmlm
from mmlm.losses import CoCaLoss, caption_loss
from mmlm.tasks import Captioning

open_clip = pytest.importorskip("open_clip")

SMALL = {
    "sot_token_id": 2,
    "text": {"vocab_size": 50, "eot_token_id": 3},
    "decoder": {"vocab_size": 50, "eot_token_id": 3},
}


def _batch(n: int = 6, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 50, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):  # [CLS] tokens [SEP], right-padded with 0 from different lengths
        k = length - i % 4
        ids[i, 0], ids[i, k - 1], ids[i, k:], mask[i, k:] = 2, 3, 0, 0
    images = torch.randn(n, 3, 32, 32, generator=g)
    return {"image": images, "input_ids": ids, "attention_mask": mask, "image_id": torch.arange(n)}


def test_coca_loss_is_open_clips():
    g = torch.Generator().manual_seed(1)
    image, text = (
        F.normalize(torch.randn(5, 8, generator=g), dim=-1),
        F.normalize(torch.randn(5, 8, generator=g), dim=-1),
    )
    logits = torch.randn(5, 7, 30, generator=g)
    labels = torch.randint(0, 30, (5, 7), generator=g)
    labels[:, 5:] = 0  # padding, and a few real zeros that OpenCLIP's ignore_index skips too
    scale = torch.tensor(14.3)
    theirs = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(image, text, logits, labels, scale)
    total, contrastive, captioning = CoCaLoss()(image, text, logits, labels, scale)
    torch.testing.assert_close(contrastive, theirs[0])
    torch.testing.assert_close(captioning, theirs[1])
    torch.testing.assert_close(total, theirs[0] + theirs[1])
    # mmlm's -100 labels (attention_mask = 0) are skipped as well, with pad_id=None too
    masked = labels.masked_fill(labels == 0, -100)
    torch.testing.assert_close(caption_loss(logits, masked, pad_id=None), theirs[1] / 2)


def test_task_steps_lower_the_loss_on_one_batch():
    torch.manual_seed(0)
    task = Captioning("coca-tiny", model_overrides=SMALL)
    batch = _batch()
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = task.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    out = task.model(batch["image"], batch["input_ids"], batch["attention_mask"])
    assert (out.labels == -100).sum() == (batch["attention_mask"][:, 1:] == 0).sum()


def test_a_clip_is_refused():
    with pytest.raises(mmlm.errors.UsageTypeError, match="not a CoCa"):
        Captioning("clip-tiny")
