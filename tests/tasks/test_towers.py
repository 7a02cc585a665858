"""A tower taken out of a CLIP, whatever its towers share, owns every weight it runs on."""

import pytest
import torch

import mmlm
from mmlm.models import CLIP, TextEncoder, VisionTransformer, clip_tower
from mmlm.tasks import ContrastiveAlignment, ImageClassification, TextClassification

SHARES = [("none", None), ("attention", None), ("attention_mlp", None), ("all", None), ("attention_mlp", (1, 2))]
IDS = ["none", "attention", "attention_mlp", "all", "attention_mlp-layer1"]


def clip(share: str, share_layers) -> CLIP:
    torch.manual_seed(0)
    return mmlm.create_model("clip-tiny", share=share, share_layers=share_layers).eval()


def inputs(modality: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    if modality == "image":
        return (torch.randn(3, 3, 32, 32, generator=g),)
    ids = torch.randint(1, 1000, (3, 7), generator=g)
    ids[:, -1] = mmlm.from_name("clip-tiny").text.eot_token_id
    return ids, torch.ones_like(ids)


def inside_clip(model: CLIP, modality: str, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """encode_image / encode_text before the projection: the tower as the CLIP runs it."""
    return model.visual(*x) if modality == "image" else model.text(*x)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("share, share_layers", SHARES, ids=IDS)
@pytest.mark.parametrize("modality", ["image", "text"])
def test_a_tower_taken_out_of_a_clip_owns_its_weights(share, share_layers, modality, tmp_path):
    model = clip(share, share_layers)
    tower = clip_tower(model, modality)
    kind, cfg = (VisionTransformer, model.cfg.vision) if modality == "image" else (TextEncoder, model.cfg.text)
    fresh = kind(cfg)  # a standalone tower of the same shape: the parameters it must own
    assert type(tower) is kind
    assert count(tower) == count(fresh) and tower.state_dict().keys() == fresh.state_dict().keys()

    x = inputs(modality)
    with torch.no_grad():
        torch.testing.assert_close(tower(*x), inside_clip(model, modality, x), rtol=0, atol=0)

    tower.train()
    tower(*x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())

    mmlm.save(tower.eval(), tmp_path / "tower")
    with torch.no_grad():
        torch.testing.assert_close(mmlm.load(tmp_path / "tower").eval()(*x), tower(*x), rtol=0, atol=0)


def test_shared_blocks_are_copied_not_borrowed():
    model = clip("all", None)
    tower = clip_tower(model, "image")
    with torch.no_grad():
        tower.blocks[0].attn.qkv.weight.add_(1.0)
    assert not torch.equal(tower.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("task, modality, kind", [(ImageClassification, "image", VisionTransformer),
                                                  (TextClassification, "text", TextEncoder)])  # fmt: skip
def test_fine_tuning_a_shared_clip_tower_registers_every_weight(task, modality, kind):
    finetune = task("clip-shared-tiny", num_classes=3)
    cfg = mmlm.from_name("clip-shared-tiny")
    encoder = kind(cfg.vision if modality == "image" else cfg.text)
    head = cfg.vision.width * 3 + 3
    assert count(finetune) == count(encoder) + head
    # before, the blocks sat outside the task; 2 blocks of width 64: attention 16,640 + MLP 33,088 + 2 norms 256
    blocks = finetune.model.blocks if modality == "image" else finetune.model.encoder.blocks
    assert count(blocks) == 2 * (16_640 + 33_088 + 256)


def test_lit_with_the_image_tower_of_a_shared_clip(tmp_path):
    source = clip("attention_mlp", None)
    mmlm.save(source, tmp_path / "shared")
    task = ContrastiveAlignment("clip-tiny", image_tower=str(tmp_path / "shared"), lock_image=True)
    visual = task.model.visual
    assert task.model.cfg.share == "none"
    assert count(visual) == count(VisionTransformer(source.cfg.vision))
    assert all(f"model.visual.{k}" in task.state_dict() for k in visual.state_dict())
    assert not any(p.requires_grad for p in visual.parameters())
    x = inputs("image")
    with torch.no_grad():
        torch.testing.assert_close(visual.eval()(*x), source.visual(*x), rtol=0, atol=0)


def test_a_head_is_kept_only_when_its_size_fits():
    vit = mmlm.create_model("vit-tiny")  # 10 classes
    same, other = (mmlm.models.vit_with_classes(vit, n) for n in (10, 4))
    assert torch.equal(same.head.weight, vit.head.weight)
    assert other.head.weight.shape == (4, vit.cfg.width)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in vit.state_dict().items() if not k.startswith("head."))


def test_a_model_without_the_tower_asked_for_is_refused():
    with pytest.raises(TypeError, match="has no text tower"):
        mmlm.models.tower(mmlm.create_model("vit-tiny"), "text")
    with pytest.raises(ValueError, match="modality must be one of image, text, not 'audio'"):
        mmlm.models.tower(mmlm.create_model("clip-tiny"), "audio")
