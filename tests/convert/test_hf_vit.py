"""HF ViTForImageClassification -> mmlm VisionTransformer, against transformers' logits."""

from __future__ import annotations

import torch
import transformers
from _parity import assert_parity, randomize_

import mmlm


def test_vit_for_image_classification(tmp_path):
    cfg = transformers.ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        image_size=40,
        patch_size=10,
        num_labels=5,
    )
    ref = randomize_(transformers.ViTForImageClassification(cfg)).eval()
    ref.save_pretrained(tmp_path)
    model = mmlm.load_pretrained(tmp_path)
    assert model.cfg.num_classes == 5 and model.cfg.norm_eps == 1e-12
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert_parity(model(images), ref(pixel_values=images).logits, what="HF ViT logits")
