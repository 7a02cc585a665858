"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` -> mmlm ``VisionTransformer``.

Files written by ``save_pretrained`` (transformers v4 and v5 alike) use the original
layout ``encoder.layer.N.attention.attention.query``; transformers v5 renamed the modules
in memory (``layers.N.attention.q_proj``), so a state dict taken from a live v5 model
uses those names: both are accepted. ``ViTModel``'s pooler (dense + tanh on the class
token) has no place in mmlm's ViT and is dropped on purpose.
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


def config_from_hf(
    hf: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None, num_classes: int = 0
) -> VisionConfig:
    """mmlm ``VisionConfig`` for a HF ``ViTConfig`` dict; ``num_classes`` > 0 keeps the classifier."""
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
    )  # fmt: skip


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
