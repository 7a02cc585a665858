"""timm ViTs -> mmlm VisionTransformer, against timm's logits."""

from __future__ import annotations

import pytest
import timm
import torch
from _parity import assert_parity, randomize_
from safetensors.torch import save_file

import mmlm


@pytest.mark.slow
def test_vit_tiny_patch16_224_state_dict_file(tmp_path):
    """A bare state dict: every shape read off the tensors, heads from timm's 64-wide convention."""
    ref = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False)).eval()
    save_file(ref.state_dict(), tmp_path / "vit_tiny.safetensors")
    model = mmlm.load_pretrained(tmp_path / "vit_tiny.safetensors")
    assert (model.cfg.width, model.cfg.depth, model.cfg.heads, model.cfg.num_classes) == (192, 12, 3, 1000)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_parity(model(images), ref(images), what="timm vit_tiny_patch16_224 logits")


def test_timm_hub_folder_patch8_img64_avg_pool(tmp_path):
    """A timm hub folder (config.json names the architecture); non-default patch, size, pooling, classes."""
    kw = dict(pretrained=False, img_size=64, patch_size=8, depth=3, global_pool="avg", num_classes=7)
    ref = randomize_(timm.create_model("vit_tiny_patch16_224", **kw)).eval()
    timm.models.save_for_hf(ref, tmp_path, safe_serialization=True)
    model = mmlm.load_pretrained(tmp_path)
    assert (model.cfg.image_size, model.cfg.patch_size, model.cfg.pool, model.cfg.num_classes) == (64, 8, "gap", 7)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_parity(model(images), ref(images), what="timm ViT patch 8 / 64 px / avg pool logits")
        backbone = mmlm.load_pretrained(tmp_path, with_heads=False)  # classifier dropped on purpose
        assert_parity(
            backbone(images),
            ref.forward_head(ref.forward_features(images), pre_logits=True),
            what="timm ViT pre-logits",
        )
