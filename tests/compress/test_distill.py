"""Distillation: the loss is OpenCLIP's ``DistillClipLoss``, the teacher stays frozen, and the YAML runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

import mmlm
from mmlm.cli import lightning_cli
from mmlm.compress import prune_clip
from mmlm.losses import distill_clip_loss, feature_distill_loss
from mmlm.tasks import ClipDistillation

ROOT = Path(__file__).resolve().parents[2]
EOT = mmlm.from_name("clip-tiny").text.eot_token_id
STUDENT = {"vision": {"width": 32, "depth": 1, "heads": 2}, "text": {"width": 32, "depth": 1, "heads": 2}}
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip


def batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 5000, (n, 10), generator=g)
    ids[:, -1] = EOT
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "image_id": torch.arange(n)}  # fmt: skip


@pytest.mark.parametrize("teacher_dim", [16, 24])
def test_loss_and_gradients_equal_open_clip_distill_clip_loss(teacher_dim):
    g = torch.Generator().manual_seed(teacher_dim)
    image, text = (F.normalize(torch.randn(6, 16, generator=g), dim=-1).requires_grad_() for _ in range(2))
    t_image, t_text = (F.normalize(torch.randn(6, teacher_dim, generator=g), dim=-1) for _ in range(2))
    scale, t_scale = torch.tensor(14.0, requires_grad=True), torch.tensor(60.0)
    ours = distill_clip_loss(image, text, scale, t_image, t_text, t_scale)
    ref = DistillClipLoss()(image, text, scale, t_image, t_text, t_scale)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    grads = torch.autograd.grad(sum(ours), [image, text, scale])
    expected = torch.autograd.grad(sum(ref), [image, text, scale])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_feature_term_is_one_minus_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert feature_distill_loss(a, a) == 0
    assert feature_distill_loss(a, torch.tensor([[0.0, 1.0], [-3.0, 0.0]])) == 1  # orthogonal
    assert feature_distill_loss(a, -a) == 2


def test_teacher_is_frozen_and_the_step_is_open_clip_s_loss():
    task = ClipDistillation("clip-tiny", "clip-tiny", STUDENT, feature_weight=0.5)
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    task.train()
    assert task.model.training and not task.teacher.training
    data = batch()
    loss = task.training_step(data, 0)
    with torch.no_grad():
        s, t = task(data), task.teacher(data["image"], data["input_ids"], data["attention_mask"])
        contrastive, distill = DistillClipLoss()(s.image_embeds, s.text_embeds, s.logit_scale,
                                                 t.image_embeds, t.text_embeds, t.logit_scale)  # fmt: skip
        feature = 1 - (F.cosine_similarity(s.image_embeds, t.image_embeds).mean()
                       + F.cosine_similarity(s.text_embeds, t.text_embeds).mean()) / 2  # fmt: skip
    torch.testing.assert_close(loss.detach(), contrastive + distill + 0.5 * feature, atol=1e-6, rtol=0)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is not None for p in task.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in task.teacher.state_dict().items())
    with pytest.raises(ValueError, match="embed_dim"):
        ClipDistillation("clip-tiny", "clip-tiny", {"embed_dim": 16}, feature_weight=1.0)


@pytest.mark.slow
def test_distill_config_trains_the_student_a_few_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = lightning_cli(["--config", "configs/align/distill-digits-tiny.yaml", *QUIET, "--trainer.default_root_dir",
                         str(tmp_path), "--model.init_args.teacher", "clip-tiny", "--trainer.max_steps", "3",
                         "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3"], run=False)  # fmt: skip
    teacher = {k: v.clone() for k, v in run.model.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in run.model.model.state_dict().items()}
    run.trainer.fit(run.model, run.datamodule)
    assert run.trainer.global_step == 3
    assert (run.model.model.cfg.vision.width, run.model.model.cfg.text.depth) == (32, 1)
    assert all(torch.equal(v, teacher[k]) for k, v in run.model.teacher.state_dict().items())
    assert not torch.equal(run.model.model.visual.blocks[0].mlp.fc1.weight, student["visual.blocks.0.mlp.fc1.weight"])
    assert "val/zeroshot_acc1" in run.trainer.callback_metrics


@pytest.mark.slow
def test_prune_recover_config_fine_tunes_a_pruned_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    pruned = prune_clip(mmlm.resolve("clip-tiny", seed=0).eval(), 0.5, [batch()])
    mmlm.save(pruned, tmp_path / "pruned")
    run = lightning_cli(["--config", "configs/align/prune-recover-digits-tiny.yaml", *QUIET, "--trainer.default_root_dir",
                         str(tmp_path), "--model.init_args.model", str(tmp_path / "pruned"), "--trainer.max_steps", "2",
                         "--trainer.limit_val_batches", "0"], run=False)  # fmt: skip
    run.trainer.fit(run.model, run.datamodule)
    assert run.trainer.global_step == 2 and run.model.model.cfg == pruned.cfg
