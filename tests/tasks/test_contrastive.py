import math

import pytest
import torch

import mmlm
from mmlm.config import from_name
from mmlm.tasks import ContrastiveAlignment
from mmlm.tasks.base import warmup_cosine

EOT = from_name("clip-tiny").text.eot_token_id


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, 9), generator=g)
    mask = torch.ones(n, 9, dtype=torch.long)
    for i in range(n):
        length = 4 + i % 5
        ids[i, length - 1] = EOT
        ids[i, length:] = 0
        mask[i, length:] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "image_id": torch.arange(n)}  # fmt: skip


def grads_after_step(task: ContrastiveAlignment, data) -> dict[str, torch.Tensor]:
    task.zero_grad()
    task.training_step(data, 0).backward()
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_micro_batches_give_the_full_batch_gradient(loss):
    overrides = {"vision": {"dropout": 0.0}, "text": {"dropout": 0.0}}
    torch.manual_seed(0)
    full = ContrastiveAlignment("clip-tiny", overrides, loss=loss)
    chunked = ContrastiveAlignment("clip-tiny", overrides, loss=loss, micro_batches=4)
    chunked.load_state_dict(full.state_dict())
    data = batch(8)
    expected, got = grads_after_step(full, data), grads_after_step(chunked, data)
    assert expected.keys() == got.keys() and "model.logit_scale" in got
    for name in expected:
        scale = expected[name].abs().max()
        assert (got[name] - expected[name]).abs().max() <= 1e-5 * scale + 1e-9, name


def test_micro_batches_match_with_patch_dropout_randomness():
    """Checkpointing replays the RNG: each chunk is recomputed with the patch-dropout mask of its
    first forward, so the chunked gradient is the gradient of the loss on the features encoded
    with those masks (here: the same chunks encoded directly, from the same RNG state)."""
    torch.manual_seed(0)
    task = ContrastiveAlignment("clip-tiny", {"vision": {"patch_dropout": 0.5}}, micro_batches=2)
    data = batch(4)
    scale = task.model.scale()

    torch.manual_seed(1)
    task.zero_grad()
    loss, objective = task._chunked_loss(data, scale, None)
    objective.backward()
    got = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}

    torch.manual_seed(1)
    task.zero_grad()
    chunks = [{k: data[k][i : i + 2] for k in ("image", "input_ids", "attention_mask")} for i in (0, 2)]
    images, texts = (torch.cat(parts) for parts in zip(*(task.features(c) for c in chunks)))
    expected_loss = task.loss_fn(images, texts, task.model.scale(), None)
    expected_loss.backward()
    expected = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}

    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert got.keys() == expected.keys() and "model.visual.patch_embed.proj.weight" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # the masks matter: other masks give another loss, so a recompute with fresh masks could not match
    torch.manual_seed(2)
    assert not torch.allclose(task._chunked_loss(data, scale, None)[0], loss)


def test_lit_locks_the_image_tower_but_top_layers():
    task = ContrastiveAlignment("clip-tiny", lock_image=True, lock_image_unlocked_layers=1)
    visual = task.model.visual
    trainable = {n for n, p in visual.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "norm.")) for n in trainable)
    assert all(p.requires_grad for p in task.model.text.parameters())
    task.train()
    assert visual.training  # partly unlocked: dropout etc. stay in training mode
    fully = ContrastiveAlignment("clip-tiny", lock_text=True).train()
    assert not fully.model.text.training and not any(p.requires_grad for p in fully.model.text.parameters())


def test_locking_a_shared_tower_is_refused():
    with pytest.raises(ValueError, match="share='none'"):
        ContrastiveAlignment("clip-shared-tiny", lock_image=True)


def test_logit_scale_is_clamped_after_each_step():
    task = ContrastiveAlignment("clip-tiny")
    with torch.no_grad():
        task.model.logit_scale.fill_(7.0)
    task.on_train_batch_end(None, None, 0)
    assert task.model.logit_scale.item() == pytest.approx(math.log(100))


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)


def test_validation_metrics_group_captions_of_one_image():
    task = ContrastiveAlignment("clip-tiny")
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    # image 0 has two captions; all captions equal their image: perfect retrieval both ways
    val = {"image": img[[0, 0, 1, 2]], "text": img[[0, 0, 1, 2]], "image_id": torch.tensor([5, 5, 7, 9])}
    metrics = task.evaluate(val)
    assert metrics["image_retrieval_recall@1"] == 1.0 and metrics["text_retrieval_recall@1"] == 1.0


def test_predict_gives_unit_embeddings_that_match_the_logits():
    task = ContrastiveAlignment("clip-tiny").eval()
    data = batch(4)
    with torch.no_grad():
        out = task.predict_step(data, 0)
        logits = task.model(data["image"], data["input_ids"], data["attention_mask"]).logits_per_image
    assert torch.allclose(out["image_embeds"].norm(dim=-1), torch.ones(4), atol=1e-6)
    torch.testing.assert_close(task.model.scale() * out["image_embeds"] @ out["text_embeds"].T, logits)


def test_a_clip_read_from_a_folder_trains_in_train_mode(tmp_path):
    import lightning as L

    from mmlm.data import ImageTextDataModule

    mmlm.save(mmlm.create_model("clip-tiny", vision={"patch_dropout": 0.5}), tmp_path / "clip")
    task = ContrastiveAlignment(str(tmp_path / "clip"))
    assert not task.model.training  # load_pretrained hands models out in eval mode
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(all(m.training for m in pl_module.model.modules()))

    dm = ImageTextDataModule("digits", preset="clip-tiny", batch_size=8, num_workers=0)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Spy()]).fit(task, dm)  # fmt: skip
    assert seen == [True, True]  # patch dropout and dropout act while training from a saved model
