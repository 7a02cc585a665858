"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` <-> mmlm ``VisionTransformer``.

Files written by ``save_pretrained`` (transformers v4 and v5 alike) use the original
layout ``encoder.layer.N.attention.attention.query``; transformers v5 renamed the modules
in memory (``layers.N.attention.q_proj``), so a state dict taken from a live v5 model
uses those names: both are accepted. ``ViTModel``'s pooler (dense + tanh on the class
token) has no place in mmlm's ViT and is dropped on purpose; exports write the on-disk layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmlm.config import HALF, VisionConfig
from mmlm.convert.common import (
    ConversionError,
    Plan,
    StateDict,
    act_from_hf,
    cat,
    chunk,
    copy,
    linear_pairs,
    mlp_ratio,
    run_plan,
    strip_prefix,
)

# (layer prefix, mmlm -> HF module names, q/k/v names) for the on-disk and the v5 in-memory layout
LAYOUTS = {
    "encoder.layer.": (
        {
            "norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
        },
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ),
    "layers.": (
        {"norm1": "layernorm_before", "attn.proj": "attention.o_proj", "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ),
}  # fmt: skip
HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}  # the same ops as mmlm's
RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL.Image.BILINEAR / BICUBIC, as image processors store them


def config_from_hf(
    hf: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None, num_classes: int = 0
) -> VisionConfig:
    """mmlm ``VisionConfig`` for a HF ``ViTConfig`` dict; ``num_classes`` > 0 keeps the classifier.

    Mean, std and interpolation come from the image processor's ``preprocessor_config.json``.
    """
    import transformers

    c = transformers.ViTConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    pre = preprocessor or {}
    return VisionConfig(
        width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
        mlp_ratio=mlp_ratio(c.hidden_size, c.intermediate_size), act=act_from_hf(c.hidden_act),
        norm_eps=c.layer_norm_eps, pre_norm=True, qkv_bias=c.qkv_bias,
        dropout=c.hidden_dropout_prob, attn_dropout=c.attention_probs_dropout_prob,
        image_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels, patch_bias=True,
        class_token=True, norm_pre=False, final_norm=True, pool="cls", num_classes=num_classes,
        image_mean=tuple(pre.get("image_mean", HALF)), image_std=tuple(pre.get("image_std", HALF)),
        interpolation="bilinear" if pre.get("resample") == RESAMPLE["bilinear"] else "bicubic",
    )  # fmt: skip


def config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    """``ViTConfig`` arguments for ``cfg``, the inverse of ``config_from_hf``; refuses what HF ViT cannot express."""
    misfits = [why for bad, why in (
        (not cfg.class_token, "no class token"),
        (cfg.pool != "cls", f"pool={cfg.pool!r} (HF ViT classifies the class token)"),
        (not cfg.pre_norm, "post-LN blocks"),
        (cfg.norm_pre, "a LayerNorm before the blocks (CLIP's ln_pre)"),
        (not cfg.final_norm, "no final LayerNorm"),
        (not cfg.patch_bias, "a patch embedding without bias"),
        (cfg.layer_scale is not None, "LayerScale"),
    ) if bad]  # fmt: skip
    if misfits:
        raise ConversionError("transformers' ViT cannot express this vision model: " + "; ".join(misfits))
    return {
        "hidden_size": cfg.width, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim, "hidden_act": HF_ACT[cfg.act], "layer_norm_eps": cfg.norm_eps,
        "qkv_bias": cfg.qkv_bias, "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
        "encoder_stride": cfg.patch_size,
    }  # fmt: skip


def preprocessor_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    """``ViTImageProcessor`` keyword arguments: resize to the model's square, then ``cfg``'s mean and std."""
    return {
        "size": {"height": cfg.image_size, "width": cfg.image_size}, "resample": RESAMPLE[cfg.interpolation],
        "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
    }  # fmt: skip


def hf_vit_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> StateDict:
    """HF ViT state dict -> state dict of ``mmlm.VisionTransformer(cfg)`` (``classifier`` -> ``head``)."""
    sd = strip_prefix(sd, "vit.")
    layout = next((p for p in LAYOUTS if f"{p}0.layernorm_before.weight" in sd), None)
    if layout is None:
        raise ConversionError("not a HF ViT state dict (no encoder.layer.0.layernorm_before.weight)")
    table, qkv = LAYOUTS[layout]
    params = ("weight", "bias") if cfg.qkv_bias else ("weight",)
    plan: Plan = {
        "cls_token": copy("embeddings.cls_token"),
        "pos_embed": copy("embeddings.position_embeddings"),
        **linear_pairs({"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}, "", ""),
    }
    for i in range(cfg.depth):
        d, s = f"blocks.{i}.", f"{layout}{i}."
        plan |= linear_pairs(table, d, s)
        for p in params:
            plan[f"{d}attn.qkv.{p}"] = cat(*(f"{s}{x}.{p}" for x in qkv))
    drop = ["pooler.dense.*"]
    if cfg.num_classes:
        plan |= linear_pairs({"head": "classifier"}, "", "")
    else:
        drop.append("classifier.*")
    return run_plan(sd, plan, drop, source="HF ViT checkpoint")


def mmlm_to_hf_vit(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> StateDict:
    """State dict of ``VisionTransformer(cfg)`` -> what ``ViTModel`` (or ``ViTForImageClassification``, keys under
    ``vit.`` and ``head`` -> ``classifier``) saves: the inverse of ``hf_vit_to_mmlm``."""
    config_to_hf(cfg)  # raises for what HF cannot express
    layout = "encoder.layer."
    table, qkv = LAYOUTS[layout]
    vit = "vit." if cfg.num_classes else ""
    plan: Plan = {
        f"{vit}embeddings.cls_token": copy("cls_token"),
        f"{vit}embeddings.position_embeddings": copy("pos_embed"),
        **linear_pairs({"embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm"}, vit, ""),
    }
    for i in range(cfg.depth):
        d, s = f"{vit}{layout}{i}.", f"blocks.{i}."
        plan |= linear_pairs({v: k for k, v in table.items()}, d, s)
        for p in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            for j, x in enumerate(qkv):
                plan[f"{d}{x}.{p}"] = chunk(f"{s}attn.qkv.{p}", j)
    if cfg.num_classes:
        plan |= linear_pairs({"classifier": "head"}, "", "")
    return run_plan(sd, plan, source="mmlm ViT state dict", target="HF ViT")
