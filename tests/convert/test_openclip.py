"""OpenCLIP checkpoints -> mmlm, against open_clip's encode_image / encode_text: ViT-B-32 / ViT-B-32-quickgelu
state dicts, and hub folders whose open_clip_config.json (written by open_clip's own ``save_config_for_hf``)
carries the options mmlm reads back or refuses."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _parity import assert_parity, randomize_
from PIL import Image
from safetensors.torch import save_file

import mmlm
from mmlm.convert.common import ConversionError
from mmlm.data.transforms import image_transform
from mmlm.paths import ASSETS

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


@pytest.mark.slow
def test_vit_b_32_safetensors(tmp_path):
    ref = randomize_(open_clip.create_model("ViT-B-32"), std=0.02).eval()
    path = tmp_path / "open_clip_vit_b_32.safetensors"
    save_file(ref.state_dict(), path)
    with pytest.warns(UserWarning, match="QuickGELU"):  # nothing in the file says which activation
        model = mmlm.load_pretrained(path)
    assert model.cfg.vision.act == model.cfg.text.act == "gelu"
    assert (model.cfg.vision.heads, model.cfg.text.heads, model.cfg.embed_dim) == (12, 8, 512)
    _compare(ref, model, "ViT-B-32")


@pytest.mark.slow
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


SMALL_CLIP = {  # heads of 64 channels, the head width mmlm assumes when a bare state dict does not say
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 64, "heads": 1, "layers": 2},
}


def _small_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 499, (2, 16))
    ids[0, 7], ids[1, 15] = 499, 499  # eot = vocab - 1, the largest id
    ids[0, 8:] = 0
    return torch.randn(2, 3, 32, 32), ids


def _assert_same_towers(model: mmlm.CLIP, ref: torch.nn.Module, what: str) -> None:
    images, ids = _small_inputs()
    with torch.no_grad():
        assert_parity(model.encode_image(images, normalize=False), ref.encode_image(images), what=f"{what} image")
        assert_parity(model.encode_text(ids, normalize=False), ref.encode_text(ids), what=f"{what} text")


def test_openai_keys_mean_quickgelu(tmp_path, recwarn):
    """A file with OpenAI's extra keys, no quickgelu in its name and no open_clip_config.json: load_pretrained
    detects QuickGELU from the keys alone, silently, and matches open_clip built with quick_gelu=True."""
    ref = randomize_(open_clip.CLIP(**SMALL_CLIP, quick_gelu=True)).eval()
    openai_extras = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
                     "vocab_size": torch.tensor(500)}  # fmt: skip
    path = tmp_path / "weights.pt"
    torch.save({**ref.state_dict(), **openai_extras}, path)
    model = mmlm.load_pretrained(path)
    assert model.cfg.vision.act == model.cfg.text.act == "quick_gelu"
    assert not [w for w in recwarn if "QuickGELU" in str(w.message)]
    _assert_same_towers(model, ref, "OpenAI-keyed small CLIP")


def test_openclip_keys_without_hints_warn_and_mean_gelu(tmp_path):
    """The same weights with OpenCLIP's keys only: nothing tells the activation, so a warning and OpenCLIP's gelu."""
    ref = randomize_(open_clip.CLIP(**SMALL_CLIP)).eval()  # quick_gelu=False: nn.GELU
    save_file(ref.state_dict(), tmp_path / "weights.safetensors")
    with pytest.warns(UserWarning, match="cannot tell whether this CLIP was trained with QuickGELU"):
        model = mmlm.load_pretrained(tmp_path / "weights.safetensors")
    assert model.cfg.vision.act == model.cfg.text.act == "gelu"
    _assert_same_towers(model, ref, "OpenCLIP-keyed small CLIP")


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


def _hub_folder(folder, model_cfg: dict, preprocess: dict | None = None) -> torch.nn.Module:
    """A random open_clip CLIP saved as OpenCLIP's hub code saves one: its weights and ``save_config_for_hf``'s
    open_clip_config.json (model_cfg + the preprocessing open_clip keeps on ``model.visual``)."""
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.push_to_hf_hub import save_config_for_hf
    from open_clip.transform import PreprocessCfg

    ref = randomize_(open_clip.CLIP(**model_cfg)).eval()
    set_model_preprocess_cfg(ref, dataclasses.asdict(PreprocessCfg(**(preprocess or {}))))
    folder.mkdir()
    save_file(ref.state_dict(), folder / "open_clip_model.safetensors")
    save_config_for_hf(ref, folder / "open_clip_config.json", model_cfg)
    return ref


def test_openclip_options_hub_folder(tmp_path):
    """OpenCLIP's switches beyond the OpenAI layout, all read back from open_clip_config.json: layer scale,
    no ln_pre, avg pooling + final LN, LayerNorm eps, tanh GELU, eos pooling at id 3, SigLIP's bias, and
    preprocessing (0.5 mean / std, bilinear). Outputs and preprocessed pixels equal open_clip's own."""
    model_cfg = {
        "embed_dim": 24, "init_logit_scale": 2.3, "init_logit_bias": -10.0,
        "vision_cfg": {"image_size": 40, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2, "mlp_ratio": 3.0,
                       "ls_init_value": 0.1, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True,
                       "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 64, "heads": 2, "layers": 2,
                     "ls_init_value": 0.1, "pool_type": "eos", "eos_id": 3, "pad_id": 1,
                     "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}},
    }  # fmt: skip
    preprocess = {"size": 40, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
    ref = _hub_folder(tmp_path / "hub", model_cfg, preprocess)
    model = mmlm.load_pretrained(tmp_path / "hub")
    v, t = model.cfg.vision, model.cfg.text
    assert (v.heads, v.mlp_ratio, v.layer_scale, v.norm_pre, v.pool, v.norm_eps, v.act) == (
        2, 3.0, 0.1, False, "gap", 1e-6, "gelu"
    )  # fmt: skip
    assert (t.heads, t.layer_scale, t.eot_token_id, t.pad_token_id, t.norm_eps, t.act) == (
        2, 0.1, 3, 1, 1e-6, "gelu_tanh"
    )  # fmt: skip
    assert (model.cfg.init_logit_scale, model.cfg.init_logit_bias) == (2.3, -10.0)
    assert model.logit_bias.item() == ref.logit_bias.item() != -10.0  # the trained value, from the weights

    ids = torch.randint(4, 500, (3, 16))  # ids above eos 3 everywhere: argmax pooling would pick another token
    ids[0, 5], ids[1, 15], ids[2, 0] = 3, 3, 3
    ids[0, 6:] = 1  # padded with pad_id
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert_parity(model.encode_image(images, normalize=False), ref.encode_image(images), what="options image")
        assert_parity(model.encode_text(ids, normalize=False), ref.encode_text(ids), what="options text")

    from open_clip.transform import PreprocessCfg, image_transform_v2

    photo = Image.open(ASSETS / "images" / "astronaut.jpg")
    theirs = image_transform_v2(PreprocessCfg(**ref.visual.preprocess_cfg), is_train=False)(photo)
    ours = image_transform(model.cfg.vision, train=False)(photo)
    assert_parity(ours, theirs, atol=1e-6, what="preprocessed pixels (bilinear, 0.5 mean / std)")


def test_openclip_options_mmlm_cannot_hold_are_refused(tmp_path):
    """Real OpenCLIP models whose outputs mmlm's CLIP cannot reproduce are refused, each option named,
    instead of loading weights that would run differently; so is a config that contradicts its weights."""
    model_cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2,
                       "pool_type": "avg", "pos_embed_type": "sin_cos_2d"},
        "text_cfg": {"context_length": 16, "vocab_size": 500, "width": 64, "heads": 2, "layers": 2,
                     "no_causal_mask": True, "pool_type": "last"},
    }  # fmt: skip
    _hub_folder(tmp_path / "clipa", model_cfg)
    with pytest.raises(ConversionError) as err:
        mmlm.load_pretrained(tmp_path / "clipa")
    for option in ("pool_type='avg'", "pos_embed_type='sin_cos_2d'", "no_causal_mask=True", "pool_type='last'"):
        assert option in str(err.value)

    _hub_folder(tmp_path / "wrong", SMALL_CLIP)
    config = json.loads((tmp_path / "wrong" / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["layers"] = 3
    (tmp_path / "wrong" / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="text_cfg.layers = 3, the weights 2"):
        mmlm.load_pretrained(tmp_path / "wrong")
