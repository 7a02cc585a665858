"""HF CLIPModel (and standalone towers, v4 and v5 layouts) -> mmlm, against transformers' own outputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from _parity import assert_parity, randomize_
from safetensors.torch import load_file, save_file

import mmlm

VOCAB = 1000
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, vocab_size=VOCAB, max_position_embeddings=24, bos_token_id=VOCAB - 2)  # fmt: skip
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=48, patch_size=8)  # fmt: skip


def texts(eot: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch of different lengths, each ending in ``eot``; ids below eot (argmax-safe)."""
    lengths, T = [5, 17, 9], 17
    ids = torch.full((3, T), pad, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB - 2, (n,))
        ids[i, n - 1] = eot
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("eos", [VOCAB - 1, 2], ids=["eos-first-match", "legacy-eos-2-argmax"])
def test_clip_model_matches_transformers(tmp_path, eos):
    cfg = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=eos), vision_config=VISION, projection_dim=32)
    ref = randomize_(transformers.CLIPModel(cfg)).eval()
    ref.save_pretrained(tmp_path)
    model = mmlm.load_pretrained(tmp_path)
    assert isinstance(model, mmlm.CLIP) and model.cfg.text.eot_token_id == VOCAB - 1

    # HF's tokenizer pads with the eot token itself: the first-eos rule must still pick the real end
    ids, mask = texts(eot=VOCAB - 1, pad=VOCAB - 1 if eos != 2 else 0)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=images)
        img = model.encode_image(images, normalize=False)
        txt = model.encode_text(ids, mask, normalize=False)
        logits = model(images, ids, mask).logits_per_image
        hf_img = ref.get_image_features(pixel_values=images)
        hf_txt = ref.get_text_features(input_ids=ids, attention_mask=mask)
    hf_img = getattr(hf_img, "pooler_output", hf_img)  # v5 returns an output object, v4 a tensor
    hf_txt = getattr(hf_txt, "pooler_output", hf_txt)
    assert_parity(img, hf_img, what=f"HF CLIP image embeds (eos={eos})")
    assert_parity(txt, hf_txt, what=f"HF CLIP text embeds (eos={eos})")
    assert_parity(logits, out.logits_per_image, what=f"HF CLIP logits_per_image (eos={eos})")


def _tower_folder(tmp_path, model: transformers.PreTrainedModel, v4_prefix: str | None) -> str:
    """Save ``model``; with ``v4_prefix`` rewrite its keys the way transformers v4 named them."""
    model.save_pretrained(tmp_path)
    if v4_prefix:
        sd = load_file(tmp_path / "model.safetensors")
        save_file(
            {f"{v4_prefix}.{k}": v for k, v in sd.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"}
        )
    return tmp_path


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_standalone_towers_in_both_key_layouts(tmp_path, layout):
    text_ref = randomize_(
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT, eos_token_id=VOCAB - 1))
    ).eval()
    vision_ref = randomize_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))).eval()
    v4 = layout == "v4"
    text = mmlm.load_pretrained(_tower_folder(tmp_path / "t", text_ref, "text_model" if v4 else None))
    vision = mmlm.load_pretrained(_tower_folder(tmp_path / "v", vision_ref, "vision_model" if v4 else None))
    assert isinstance(text, mmlm.TextEncoder) and isinstance(vision, mmlm.VisionTransformer)
    if not v4:
        assert not any(k.startswith("text_model.") for k in load_file(tmp_path / "t" / "model.safetensors"))

    ids, mask = texts(eot=VOCAB - 1, pad=0)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert_parity(
            text(ids, mask), text_ref(input_ids=ids, attention_mask=mask).pooler_output, what=f"CLIPTextModel {layout}"
        )
        assert_parity(vision(images), vision_ref(pixel_values=images).pooler_output, what=f"CLIPVisionModel {layout}")


def test_preprocessor_mean_std_are_read(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config=dict(TEXT, eos_token_id=VOCAB - 1), vision_config=VISION, projection_dim=32
    )
    transformers.CLIPModel(cfg).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    )
    assert mmlm.load_pretrained(tmp_path).cfg.vision.image_std == (0.25, 0.25, 0.25)
