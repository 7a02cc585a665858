"""Strict key checks and safe file reading."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, save_file

import mmlm
from mmlm.checkpoint import detect_format, read_state_dict
from mmlm.convert import ConversionError, timm_vit


@pytest.fixture(scope="module")
def timm_sd() -> dict[str, torch.Tensor]:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=3).state_dict()


def test_extra_key_is_named(timm_sd, tmp_path):
    sd = dict(timm_sd, **{"blocks.0.attn.q_norm.weight": torch.ones(64)})
    with pytest.raises(ConversionError, match=r"unused key\(s\) \(1\): blocks\.0\.attn\.q_norm\.weight"):
        timm_vit.timm_vit_to_mmlm(sd, timm_vit.config_from_state_dict(timm_sd))
    save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.q_norm\.weight"):
        mmlm.load_pretrained(tmp_path / "extra.safetensors")


def test_missing_key_is_named(timm_sd):
    cfg = timm_vit.config_from_state_dict(timm_sd)
    sd = {k: v for k, v in timm_sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ConversionError, match=r"missing key\(s\) \(1\): blocks\.1\.mlp\.fc2\.bias"):
        timm_vit.timm_vit_to_mmlm(sd, cfg)


def test_missing_key_in_a_transformers_folder_is_named(tmp_path):
    tc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100, max_position_embeddings=8, eos_token_id=99)  # fmt: skip
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=8)).save_pretrained(
        tmp_path
    )
    sd = load_file(tmp_path / "model.safetensors")
    del sd["vision_model.encoder.layers.0.self_attn.k_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"vision_model\.encoder\.layers\.0\.self_attn\.k_proj\.weight"):
        mmlm.load_pretrained(tmp_path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated; we only need an archive
def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(ConversionError, match="TorchScript"):
        read_state_dict(path)
    with pytest.raises(ConversionError, match="TorchScript"):
        mmlm.load_pretrained(path)


def test_pickles_are_read_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        read_state_dict(path)


def test_training_checkpoint_wrappers_are_unwrapped(timm_sd, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in timm_sd.items()}}, path)
    assert read_state_dict(path).keys() == timm_sd.keys()
    assert detect_format(path) == "timm"


def test_mmlm_checkpoint_loads_as_itself(tmp_path):
    model = mmlm.create_model("vit-tiny").eval()
    mmlm.save(model, tmp_path)
    assert detect_format(tmp_path) == "mmlm"
    again = mmlm.load_pretrained(tmp_path)
    backbone = mmlm.load_pretrained(tmp_path, with_heads=False)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images), rtol=0, atol=0)
        torch.testing.assert_close(backbone(images), model.pool(model.forward_features(images)), rtol=0, atol=0)


def test_unsupported_transformers_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="llama"):
        mmlm.load_pretrained(tmp_path)
