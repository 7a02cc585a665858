"""mmlm CLIP -> export_hf_clip -> transformers.CLIPModel.from_pretrained gives the same outputs."""

from __future__ import annotations

import pytest
import torch
import transformers
from _parity import assert_parity, randomize_

import mmlm
from mmlm.convert import ConversionError
from mmlm.pretrained import convert


def _clip() -> mmlm.CLIP:
    # non-default: text and vision of different width/heads/depth, patch 8 on 40 px
    cfg = mmlm.config.update(
        mmlm.from_name("clip-tiny"),
        vision={"width": 48, "heads": 3, "depth": 3, "image_size": 40},
        text={"width": 64, "heads": 4, "depth": 2},
    )
    return randomize_(mmlm.create_model(cfg)).eval()


def test_round_trip_through_transformers(tmp_path):
    model = _clip()
    mmlm.export_hf_clip(model, tmp_path / "hf")
    ref = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    eot = model.cfg.text.eot_token_id
    ids = torch.randint(1, eot, (3, 11))  # right-padded with 0, each text ending in eot
    mask = torch.ones(3, 11, dtype=torch.long)
    for i, n in enumerate([4, 11, 7]):
        ids[i, n - 1], ids[i, n:], mask[i, n:] = eot, 0, 0
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        hf_img = ref.get_image_features(pixel_values=images)
        hf_txt = ref.get_text_features(input_ids=ids, attention_mask=mask)
        hf_img = getattr(hf_img, "pooler_output", hf_img)
        hf_txt = getattr(hf_txt, "pooler_output", hf_txt)
        assert_parity(hf_img, model.encode_image(images, normalize=False), what="export: HF image embeds vs mmlm")
        assert_parity(hf_txt, model.encode_text(ids, mask, normalize=False), what="export: HF text embeds vs mmlm")
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=images)
        assert_parity(out.logits_per_image, model(images, ids, mask).logits_per_image, what="export: HF logits_per_image vs mmlm")

    # and back: the HF folder loads into the very same mmlm weights
    back = mmlm.load_pretrained(tmp_path / "hf")
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_convert_entry_point_both_directions(tmp_path):
    model = _clip()
    mmlm.save(model, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "again", to="mmlm")
    again = mmlm.load(tmp_path / "again")
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), model.encode_image(images), rtol=0, atol=0)


def test_shared_towers_do_not_export(tmp_path):
    with pytest.raises(ConversionError, match="share='attention_mlp'"):
        mmlm.export_hf_clip(mmlm.create_model("clip-shared-tiny"), tmp_path)
    with pytest.raises(ConversionError, match="CLIP models only"):
        mmlm.save(mmlm.create_model("bert-tiny"), tmp_path / "bert")
        convert(tmp_path / "bert", tmp_path / "hf", to="hf")
