import math

import open_clip
import pytest

import mmlm
from mmlm.config import CLIPConfig, from_dict, from_name, to_dict, update


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_clip_b32_has_openclip_parameter_count():
    # OpenCLIP's ViT-B-32: 151,277,313 parameters (151.28 M)
    assert n_params(mmlm.create_model("clip-vit-b-32")) == 151_277_313


@pytest.mark.slow
def test_clip_b16_matches_openclip_parameter_count():
    assert n_params(mmlm.create_model("clip-vit-b-16")) == n_params(open_clip.create_model("ViT-B-16"))


def test_every_preset_round_trips_through_dict():
    for name in mmlm.list_presets():
        cfg = from_name(name)
        assert from_dict(to_dict(cfg)) == cfg, name


def test_overrides_reach_nested_fields():
    cfg = from_name("clip-tiny", share="all", vision={"patch_dropout": 0.5}, **{"text.causal": False})
    assert (cfg.share, cfg.vision.patch_dropout, cfg.text.causal) == ("all", 0.5, False)
    assert from_name("clip-tiny").vision.patch_dropout == 0.0  # presets are not mutated
    with pytest.raises(TypeError, match="no_such_field"):
        update(cfg, no_such_field=1)


def test_logit_scale_defaults_follow_clip_and_siglip():
    assert from_name("clip-vit-b-32").init_logit_scale == pytest.approx(math.log(1 / 0.07))
    siglip = from_name("siglip-vit-b-16")
    assert (siglip.init_logit_scale, siglip.init_logit_bias) == (pytest.approx(math.log(10)), -10.0)


def test_sharing_needs_equal_block_shapes():
    base = from_name("clip-vit-b-32")  # text width 512 vs vision 768
    with pytest.raises(ValueError, match="width"):
        CLIPConfig(embed_dim=512, vision=base.vision, text=base.text, share="attention")
    with pytest.raises(ValueError, match="share_layers"):
        update(from_name("clip-shared-tiny"), share_layers=(1, 5))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="clip-vit-b-32"):
        from_name("clip-vit-z-99")
