"""A new mmlm model starts as its reference does: per-tensor statistics against the reference library's own init.

Each reference (transformers BERT / GPT-2, timm ViT, OpenCLIP) is built with random
weights at the same shapes as an mmlm model of its family, its state dict is renamed
into mmlm's by the converters, and every tensor of the mmlm model is compared with its
counterpart: the standard deviation within 10% (or, for vectors too short to estimate a
std that closely, within 3 standard errors of the estimate), the mean within 5 standard
errors of the reference's, and tensors the reference sets to constants (zero biases,
LayerNorm 1 / 0, LayerScale) equal exactly.
"""

from __future__ import annotations

import math
import os

import open_clip
import pytest
import timm
import torch
import transformers

import mmlm
from mmlm.config import CLIPConfig, TextWithHeadsConfig, from_name
from mmlm.convert.hf_bert import hf_bert_to_mmlm
from mmlm.convert.hf_gpt2 import hf_gpt2_to_mmlm
from mmlm.convert.openclip import openclip_to_mmlm
from mmlm.convert.timm_vit import timm_vit_to_mmlm

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every reference is built locally

WIDTH, DEPTH, HEADS, VOCAB, CONTEXT = 256, 2, 4, 1000, 32


def compare_init(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    """Assert that every tensor of ``ours`` is distributed as its counterpart in ``ref``; print the
    largest relative std deviation seen (``pytest -s`` shows it)."""
    assert ours.keys() == ref.keys(), f"{what}: keys differ: {sorted(ours.keys() ^ ref.keys())}"
    worst = 0.0
    for key, a in ours.items():
        b = ref[key]
        assert a.shape == b.shape, f"{what} {key}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
        a, b = a.double(), b.double()
        if b.numel() == 1 or b.std() == 0:  # a constant: zero bias, LayerNorm 1 / 0, LayerScale, logit scale
            assert torch.equal(a, b), f"{what} {key}: reference is constant {b.flatten()[0].item()}, ours is not"
            continue
        n = b.numel()
        deviation = abs(a.std().item() / b.std().item() - 1)
        # a std estimated from n values has relative standard error 1/sqrt(2n): the ratio of two, 1/sqrt(n)
        tolerance = max(0.10, 3 / math.sqrt(n))
        assert deviation <= tolerance, f"{what} {key}: std {a.std():.4g} vs reference {b.std():.4g}"
        assert abs(a.mean() - b.mean()) <= 5 * b.std() * math.sqrt(2 / n), (
            f"{what} {key}: mean {a.mean():.3g} vs reference {b.mean():.3g}"
        )
        worst = max(worst, deviation)
    print(f"[init] {what}: {len(ours)} tensors, max relative std deviation {worst:.3f}")


@pytest.mark.parametrize("preset", ["bert-tiny", "minilm-tiny"])
def test_bert_starts_as_transformers_bert(preset):
    text = from_name(preset, width=WIDTH, depth=DEPTH, heads=HEADS, vocab_size=VOCAB, context_length=CONTEXT)
    heads = ("pooler", "mlm", "nsp")
    ours = mmlm.create_model(TextWithHeadsConfig(text=text, heads=heads))
    hf = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH, max_position_embeddings=CONTEXT, type_vocab_size=2, pad_token_id=0,
    )  # fmt: skip
    ref = transformers.BertForPreTraining(hf)
    compare_init(ours.state_dict(), hf_bert_to_mmlm(ref.state_dict(), text, heads), f"{preset} vs BertForPreTraining")
    # transformers zeroes the padding row of the word embeddings (padding_idx)
    assert not ours.encoder.token_embed.weight[text.pad_token_id].any()


def test_new_classifier_head_starts_as_transformers_bert_classifier():
    text = from_name("bert-tiny", width=WIDTH, depth=DEPTH, heads=HEADS, vocab_size=VOCAB, context_length=CONTEXT)
    ours = mmlm.create_model(TextWithHeadsConfig(text=text, heads=("classifier",), num_labels=8))
    hf = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS,
        intermediate_size=WIDTH, num_labels=8,
    )  # fmt: skip
    ref = transformers.BertForSequenceClassification(hf)
    head = lambda sd: {k: v for k, v in sd.items() if k.startswith("classifier.")}  # noqa: E731
    compare_init(head(ours.state_dict()), head(ref.state_dict()), "classifier vs BertForSequenceClassification")


def test_gpt2_starts_as_transformers_gpt2():
    text = from_name("gpt2-tiny", width=WIDTH, depth=DEPTH, heads=HEADS, vocab_size=VOCAB, context_length=CONTEXT)
    ours = mmlm.create_model(TextWithHeadsConfig(text=text, heads=("clm",)))
    hf = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=DEPTH, n_head=HEADS, n_positions=CONTEXT,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
    )  # fmt: skip
    ref = transformers.GPT2LMHeadModel(hf)
    compare_init(ours.state_dict(), hf_gpt2_to_mmlm(ref.state_dict(), text, ("clm",)), "gpt2-tiny vs GPT2LMHeadModel")
    # the residual projections are scaled by 1/sqrt(2 depth): at depth 2, 0.01 instead of 0.02
    assert ref.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_vit_starts_as_timm_vit():
    cfg = from_name("vit-tiny", width=WIDTH, depth=DEPTH, heads=HEADS, layer_scale=1e-5)
    ours = mmlm.create_model(cfg)
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=cfg.image_size, patch_size=cfg.patch_size,
        embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=cfg.num_classes, init_values=1e-5,
    )  # fmt: skip
    compare_init(ours.state_dict(), timm_vit_to_mmlm(ref.state_dict(), cfg), "vit-tiny vs timm VisionTransformer")


def openclip_reference(cfg: CLIPConfig) -> torch.nn.Module:
    return open_clip.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg={"image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size, "width": WIDTH,
                    "layers": DEPTH, "head_width": WIDTH // HEADS},
        text_cfg={"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS, "layers": DEPTH},
    )  # fmt: skip


def clip_config(share: str = "none") -> CLIPConfig:
    tower = {"width": WIDTH, "depth": DEPTH, "heads": HEADS}
    text = {**tower, "vocab_size": VOCAB, "context_length": CONTEXT}
    return from_name("clip-tiny", embed_dim=128, vision=tower, text=text, share=share)


def test_clip_starts_as_openclip():
    cfg = clip_config()
    ours = mmlm.create_model(cfg)
    compare_init(ours.state_dict(), openclip_to_mmlm(openclip_reference(cfg).state_dict(), cfg), "clip vs OpenCLIP")


def shared_key_in_two_towers(key: str) -> str:
    """``blocks.N.part[.modality].rest`` of a shared stack -> the key of the tower whose init it follows:
    a part kept per modality that modality's tower, a shared part the text tower (OpenCLIP's only block init)."""
    if not key.startswith("blocks."):
        return key
    _, layer, part, *rest = key.split(".")
    modality = rest.pop(0) if rest[0] in ("image", "text") else "text"
    return ".".join([{"image": "visual", "text": "text"}[modality], "blocks", layer, part, *rest])


@pytest.mark.parametrize("share", ["attention", "attention_mlp", "all"])
def test_shared_clip_blocks_start_as_openclip(share):
    cfg = clip_config(share)
    ours = mmlm.create_model(cfg)
    ref = openclip_to_mmlm(openclip_reference(cfg).state_dict(), clip_config())
    ours_as_towers = {shared_key_in_two_towers(k): v for k, v in ours.state_dict().items()}
    ref = {k: v for k, v in ref.items() if k in ours_as_towers}  # the other modality's copy of a shared part
    compare_init(ours_as_towers, ref, f"clip share={share} vs OpenCLIP")
