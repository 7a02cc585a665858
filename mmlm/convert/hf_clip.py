"""Hugging Face ``CLIPModel`` (and its standalone towers) <-> mmlm ``CLIP``.

HF keeps q, k, v as three Linears (fused here into ``attn.qkv``), names the pre-blocks
LayerNorm ``pre_layrnorm`` (sic) and stores the class embedding and vision positions
without the leading batch dimensions mmlm's (timm's) parameters have. Layouts accepted:

- ``CLIPModel``: ``text_model.*``, ``vision_model.*``, ``text_projection``, ``visual_projection``,
  ``logit_scale`` (the same in transformers v4 and v5);
- ``CLIPTextModel`` / ``CLIPVisionModel`` saved alone: ``text_model.*`` / ``vision_model.*``
  in v4, no prefix in v5 (the tower classes stopped wrapping a ``*Transformer``).

``CLIPModel`` has no ``logit_bias``: a SigLIP-style mmlm CLIP keeps its bias as an extra
``logit_bias`` tensor (which transformers skips) and ``logit_bias_init_value`` in config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmlm.config import OPENAI_MEAN, OPENAI_STD, CLIPConfig, TextConfig, VisionConfig
from mmlm.convert.common import (
    ConversionError,
    Op,
    Plan,
    StateDict,
    act_from_hf,
    cat,
    chunk,
    copy,
    linear_pairs,
    mlp_ratio,
    reshape,
    run_plan,
)

# mmlm module name -> HF module name, inside one encoder layer
LAYER = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
TEXT = {"norm": "final_layer_norm"}
VISION = {"norm_pre": "pre_layrnorm", "norm": "post_layernorm"}
# position ids are a buffer in older transformers files, recomputed by both libraries
DROP = ("*embeddings.position_ids",)

# ------------------------------------------------------------------------------ configs


def _hf_configs(hf: Mapping[str, Any]) -> Any:
    """The transformers config object for a config.json dict, so that omitted fields get HF's defaults."""
    import transformers

    kind = hf.get("model_type", "clip")
    cls = {
        "clip": transformers.CLIPConfig,
        "clip_text_model": transformers.CLIPTextConfig,
        "clip_vision_model": transformers.CLIPVisionConfig,
    }.get(kind)
    if cls is None:
        raise ConversionError(f"not a CLIP config: model_type {kind!r}")
    return cls(**{k: v for k, v in hf.items() if k != "model_type"})


def text_config_from_hf(hf: Mapping[str, Any]) -> TextConfig:
    """mmlm ``TextConfig`` for a HF ``CLIPTextConfig`` (a dict from config.json)."""
    c = _hf_configs({"model_type": "clip_text_model", **hf})
    # Before transformers PR #24773 configs said eos_token_id = 2 and HF pools at argmax(input_ids):
    # the end-of-text token is the largest id of the OpenAI vocabulary, i.e. vocab_size - 1.
    eot = c.vocab_size - 1 if c.eos_token_id == 2 else c.eos_token_id
    return TextConfig(
        width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
        mlp_ratio=mlp_ratio(c.hidden_size, c.intermediate_size), act=act_from_hf(c.hidden_act),
        norm_eps=c.layer_norm_eps, pre_norm=True, qkv_bias=True, dropout=0.0, attn_dropout=c.attention_dropout,
        vocab_size=c.vocab_size, context_length=c.max_position_embeddings, causal=True, pool="eot",
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0, eot_token_id=eot,
    )  # fmt: skip


def vision_config_from_hf(hf: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> VisionConfig:
    """mmlm ``VisionConfig`` for a HF ``CLIPVisionConfig``; mean/std from preprocessor_config.json if given."""
    c = _hf_configs({"model_type": "clip_vision_model", **hf})
    pre = preprocessor or {}
    return VisionConfig(
        width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
        mlp_ratio=mlp_ratio(c.hidden_size, c.intermediate_size), act=act_from_hf(c.hidden_act),
        norm_eps=c.layer_norm_eps, pre_norm=True, qkv_bias=True, dropout=0.0, attn_dropout=c.attention_dropout,
        image_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels, patch_bias=False,
        class_token=True, norm_pre=True, final_norm=True, pool="cls", init="clip",
        image_mean=tuple(pre.get("image_mean", OPENAI_MEAN)), image_std=tuple(pre.get("image_std", OPENAI_STD)),
    )  # fmt: skip


def config_from_hf(hf: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> CLIPConfig:
    """mmlm ``CLIPConfig`` for a HF ``CLIPConfig`` dict (config.json of a ``CLIPModel``)."""
    c = _hf_configs(hf)
    return CLIPConfig(
        embed_dim=c.projection_dim,
        vision=vision_config_from_hf(c.vision_config.to_dict(), preprocessor),
        text=text_config_from_hf(c.text_config.to_dict()),
        init_logit_scale=c.logit_scale_init_value,
        init_logit_bias=hf.get("logit_bias_init_value"),
    )


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """HF ``CLIPConfig`` keyword arguments for an mmlm CLIP; refuses what ``CLIPModel`` cannot express."""
    t, v = cfg.text, cfg.vision
    problems = []
    if cfg.share != "none":
        problems.append(f"share={cfg.share!r} (HF CLIPModel has two separate towers; only share='none' exports)")
    for name, c in (("text", t), ("vision", v)):
        if not c.pre_norm or not c.qkv_bias or c.layer_scale is not None or not c.final_norm:
            problems.append(f"{name}: HF CLIP needs pre_norm, qkv_bias, final_norm and no layer_scale")
        if c.width * c.mlp_ratio != c.mlp_dim:
            problems.append(f"{name}: fractional MLP size {c.width} * {c.mlp_ratio}")
    if not t.causal or t.pool != "eot" or t.pos_embed != "learned" or t.type_vocab_size or t.embed_norm:
        problems.append(
            "text: HF CLIP needs a causal, eot-pooled tower with learned positions, no token types, no embed norm"
        )
    if t.eot_token_id is None or t.eot_token_id == 2:
        # HF treats eos_token_id == 2 as the legacy argmax(input_ids) rule, not "first token 2"
        problems.append(f"text: eot_token_id {t.eot_token_id} cannot be expressed as HF's eos_token_id")
    if v.patch_bias or not v.class_token or not v.norm_pre or v.pool != "cls" or v.num_classes:
        problems.append("vision: HF CLIP needs a bias-free patch conv, a class token, norm_pre, cls pooling, no head")
    if problems:
        raise ConversionError("cannot export this CLIP to transformers.CLIPModel:\n  " + "\n  ".join(problems))
    hf_act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}

    def common(c: Any) -> dict[str, Any]:
        return {
            "hidden_size": c.width, "intermediate_size": c.mlp_dim, "num_hidden_layers": c.depth,
            "num_attention_heads": c.heads, "hidden_act": hf_act[c.act], "layer_norm_eps": c.norm_eps,
            "attention_dropout": c.attn_dropout,
        }  # fmt: skip

    text = dict(
        common(t), vocab_size=t.vocab_size, max_position_embeddings=t.context_length,
        eos_token_id=t.eot_token_id, pad_token_id=t.pad_token_id, projection_dim=cfg.embed_dim,
    )  # fmt: skip
    vision = dict(
        common(v), image_size=v.image_size, patch_size=v.patch_size, num_channels=v.in_chans, projection_dim=cfg.embed_dim
    )  # fmt: skip
    bias = {} if cfg.init_logit_bias is None else {"logit_bias_init_value": cfg.init_logit_bias}
    return dict(
        text_config=text,
        vision_config=vision,
        projection_dim=cfg.embed_dim,
        logit_scale_init_value=cfg.init_logit_scale,
        **bias,  # not a CLIPConfig field: kept as an attribute, read back by config_from_hf
    )


# ------------------------------------------------------------------------------ plans


def _layers(depth: int, dst: str, src: str) -> Plan:
    plan: Plan = {}
    for i in range(depth):
        d, s = f"{dst}blocks.{i}.", f"{src}encoder.layers.{i}."
        plan |= linear_pairs(LAYER, d, s)
        for p in ("weight", "bias"):
            plan[f"{d}attn.qkv.{p}"] = cat(*(f"{s}self_attn.{x}_proj.{p}" for x in "qkv"))
    return plan


def _text_plan(cfg: TextConfig, dst: str, src: str) -> Plan:
    return {
        f"{dst}token_embed.weight": copy(f"{src}embeddings.token_embedding.weight"),
        f"{dst}pos_embed": copy(f"{src}embeddings.position_embedding.weight"),
        **linear_pairs(TEXT, dst, src),
        **_layers(cfg.depth, dst, src),
    }


def _vision_plan(cfg: VisionConfig, dst: str, src: str) -> Plan:
    W = cfg.width
    return {
        # HF: (W,) and (1 + N, W); mmlm/timm: (1, 1, W) and (1, 1 + N, W)
        f"{dst}cls_token": reshape(f"{src}embeddings.class_embedding", 1, 1, W),
        f"{dst}pos_embed": reshape(f"{src}embeddings.position_embedding.weight", 1, 1 + cfg.grid_size**2, W),
        f"{dst}patch_embed.proj.weight": copy(f"{src}embeddings.patch_embedding.weight"),
        **linear_pairs(VISION, dst, src),
        **_layers(cfg.depth, dst, src),
    }


def _tower_prefix(sd: Mapping[str, torch.Tensor], tower: str) -> str:
    """``text_model.`` / ``vision_model.`` in CLIPModel and v4 tower files, nothing in v5 tower files."""
    return f"{tower}." if any(k.startswith(f"{tower}.") for k in sd) else ""


def hf_clip_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: CLIPConfig) -> StateDict:
    """State dict of a HF ``CLIPModel`` -> state dict of ``mmlm.CLIP(cfg)``."""
    if cfg.share != "none":
        raise ConversionError("HF CLIPModel has two separate towers: convert into share='none'")
    plan = {
        **_text_plan(cfg.text, "text.", "text_model."),
        **_vision_plan(cfg.vision, "visual.", "vision_model."),
        "text_projection.weight": copy("text_projection.weight"),
        "visual_projection.weight": copy("visual_projection.weight"),
        "logit_scale": copy("logit_scale"),
    }
    if cfg.init_logit_bias is not None:
        plan["logit_bias"] = copy("logit_bias")
    return run_plan(sd, plan, DROP, source="HF CLIPModel checkpoint")


def hf_clip_text_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: TextConfig) -> StateDict:
    """State dict of a HF ``CLIPTextModel`` (v4 or v5 layout) -> state dict of ``mmlm.TextEncoder(cfg)``."""
    plan = _text_plan(cfg, "", _tower_prefix(sd, "text_model"))
    return run_plan(sd, plan, DROP, source="HF CLIPTextModel checkpoint")


def hf_clip_vision_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> StateDict:
    """State dict of a HF ``CLIPVisionModel`` (v4 or v5 layout) -> state dict of ``mmlm.VisionTransformer(cfg)``."""
    plan = _vision_plan(cfg, "", _tower_prefix(sd, "vision_model"))
    return run_plan(sd, plan, DROP, source="HF CLIPVisionModel checkpoint")


def mmlm_to_hf_clip(sd: Mapping[str, torch.Tensor], cfg: CLIPConfig) -> StateDict:
    """State dict of ``mmlm.CLIP(cfg)`` -> state dict of a HF ``CLIPModel`` (the inverse of ``hf_clip_to_mmlm``)."""
    config_to_hf(cfg)  # raises for what HF cannot express
    plan: Plan = {}
    for ours, theirs, c in (("text.", "text_model.", cfg.text), ("visual.", "vision_model.", cfg.vision)):
        for i in range(c.depth):
            d, s = f"{theirs}encoder.layers.{i}.", f"{ours}blocks.{i}."
            plan |= linear_pairs({v: k for k, v in LAYER.items()}, d, s)
            for p in ("weight", "bias"):
                for j, x in enumerate("qkv"):
                    plan[f"{d}self_attn.{x}_proj.{p}"] = chunk(f"{s}attn.qkv.{p}", j)
    t, v = "text_model.", "vision_model."
    W = cfg.vision.width
    plan |= {
        f"{t}embeddings.token_embedding.weight": copy("text.token_embed.weight"),
        f"{t}embeddings.position_embedding.weight": copy("text.pos_embed"),
        **linear_pairs({v_: k for k, v_ in TEXT.items()}, t, "text."),
        f"{v}embeddings.class_embedding": reshape("visual.cls_token", W),
        f"{v}embeddings.position_embedding.weight": reshape("visual.pos_embed", 1 + cfg.vision.grid_size**2, W),
        f"{v}embeddings.patch_embedding.weight": copy("visual.patch_embed.proj.weight"),
        **linear_pairs({v_: k for k, v_ in VISION.items()}, v, "visual."),
        "text_projection.weight": copy("text_projection.weight"),
        "visual_projection.weight": copy("visual_projection.weight"),
        # HF does not clamp logit_scale in forward, mmlm does: export the value mmlm actually uses
        "logit_scale": Op(("logit_scale",), lambda s: s.clamp(0, cfg.max_logit_scale)),
    }
    if cfg.init_logit_bias is not None:
        plan["logit_bias"] = copy("logit_bias")
    return run_plan(sd, plan, source="mmlm CLIP state dict", target="HF CLIPModel")
