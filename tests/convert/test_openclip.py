"""OpenCLIP ViT-B-32 / ViT-B-32-quickgelu state dicts -> mmlm, against open_clip's encode_image / encode_text."""

from __future__ import annotations

import json

import pytest
import torch
from _parity import assert_parity, randomize_
from safetensors.torch import save_file

import mmlm
from mmlm.convert import openclip as openclip_convert

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a photo of a cat", "a diagram of a transformer block with two layer norms", "dog"]


def _compare(ref: torch.nn.Module, model: mmlm.CLIP, name: str) -> None:
    ids = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)  # (3, 77), zero-padded, eot = 49407
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_parity(
            model.encode_image(images, normalize=False), ref.encode_image(images), what=f"{name} encode_image"
        )
        assert_parity(model.encode_text(ids, normalize=False), ref.encode_text(ids), what=f"{name} encode_text")


def test_vit_b_32_safetensors(tmp_path):
    ref = randomize_(open_clip.create_model("ViT-B-32"), std=0.02).eval()
    path = tmp_path / "open_clip_vit_b_32.safetensors"
    save_file(ref.state_dict(), path)
    with pytest.warns(UserWarning, match="QuickGELU"):  # nothing in the file says which activation
        model = mmlm.load_pretrained(path)
    assert model.cfg.vision.act == model.cfg.text.act == "gelu"
    assert (model.cfg.vision.heads, model.cfg.text.heads, model.cfg.embed_dim) == (12, 8, 512)
    _compare(ref, model, "ViT-B-32")


def test_vit_b_32_quickgelu_fp16_pickle(tmp_path):
    """An fp16 ``torch.save`` file; the quickgelu name alone selects the activation."""
    ref = randomize_(open_clip.create_model("ViT-B-32-quickgelu"), std=0.02).eval()
    half = {k: v.half() for k, v in ref.state_dict().items()}
    path = tmp_path / "ViT-B-32-quickgelu.pt"
    torch.save(half, path)
    ref.load_state_dict({k: v.float() for k, v in half.items()})  # the reference sees the same rounded weights
    model = mmlm.load_pretrained(path)
    assert model.cfg.vision.act == model.cfg.text.act == "quick_gelu"
    assert next(model.parameters()).dtype == torch.float32
    _compare(ref, model, "ViT-B-32-quickgelu (fp16 file)")


def test_openai_keys_mean_quickgelu():
    sd = {"input_resolution": torch.tensor(224), "visual.conv1.weight": torch.zeros(1)}
    assert openclip_convert.is_openai(sd)


def test_small_openclip_hub_folder(tmp_path):
    """A non-default size (width 96, patch 8 on 32 px, 2 and 3 layers) in OpenCLIP's hub layout;
    open_clip_config.json alone says quick_gelu and the text tower's 4 heads."""
    model_cfg = {
        "embed_dim": 24,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2},
        "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 64, "heads": 4, "layers": 3},
    }
    ref = randomize_(open_clip.CLIP(**model_cfg)).eval()
    save_file(ref.state_dict(), tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    model = mmlm.load_pretrained(tmp_path)
    assert model.cfg.vision.act == "quick_gelu" and model.cfg.text.heads == 4 and model.cfg.vision.heads == 2
    ids = torch.randint(1, 499, (3, 16))
    ids[:, 0], ids[0, 5], ids[1, 15], ids[2, 9] = 498, 499, 499, 499  # eot = vocab - 1, the largest id
    ids[0, 6:], ids[2, 10:] = 0, 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_parity(
            model.encode_image(images, normalize=False), ref.encode_image(images), what="small OpenCLIP image"
        )
        assert_parity(model.encode_text(ids, normalize=False), ref.encode_text(ids), what="small OpenCLIP text")
