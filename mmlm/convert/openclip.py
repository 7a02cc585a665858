"""OpenAI CLIP / OpenCLIP state dicts <-> mmlm ``CLIP``.

Both use ``nn.MultiheadAttention`` (q, k, v already fused in ``in_proj_weight``) and
store the two projections ``visual.proj`` / ``text_projection`` as [in, out] matrices
used as ``x @ proj``, so they are transposed into ``nn.Linear`` weights.

Nothing in these files says how many attention heads there are or which activation
was trained: heads follow OpenAI's and OpenCLIP's convention of 64-wide heads, and
the activation is an argument (OpenAI weights need ``quick_gelu``; OpenCLIP models
trained from scratch mostly use ``gelu``, those named ``*-quickgelu`` ``quick_gelu``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

# the preset builders hold what an OpenAI tower looks like; only the shapes are read off the file
from mmlm.config import Activation, CLIPConfig, TransformerConfig, _clip_text, _clip_vision, update
from mmlm.convert.common import (
    ConversionError,
    Op,
    Plan,
    StateDict,
    copy,
    count_layers,
    linear_pairs,
    mlp_ratio,
    reshape,
    run_plan,
    transpose,
)

# mmlm module name -> OpenAI module name, inside one residual attention block
LAYER = {"norm1": "ln_1", "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
VISION = {"norm_pre": "ln_pre", "norm": "ln_post"}
TEXT = {"norm": "ln_final"}
DROP = (
    # OpenAI's own files carry these scalars next to the weights
    "input_resolution",
    "context_length",
    "vocab_size",
    # the causal mask, a persistent buffer in older OpenCLIP versions
    "attn_mask",
)
# Keys only OpenAI's released files have: they were all trained with QuickGELU.
OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")
HEAD_WIDTH = 64


def is_openai(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k in sd for k in OPENAI_MARKERS)


def config_from_state_dict(
    sd: Mapping[str, torch.Tensor], act: Activation = "gelu", head_width: int = HEAD_WIDTH
) -> CLIPConfig:
    """Read every shape off the tensors (as OpenCLIP's ``build_model_from_openai_state_dict`` does)."""
    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        raise ConversionError(
            "not an OpenAI/OpenCLIP ViT CLIP state dict (no visual.conv1.weight / token_embedding.weight)"
        )
    vw, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    vdepth = count_layers(sd, "visual.transformer.resblocks.")
    vision = update(
        _clip_vision(patch, width=vw, depth=vdepth, heads=vw // head_width, image_size=grid * patch),
        mlp_ratio=mlp_ratio(vw, sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        act=act,
    )

    vocab, tw = sd["token_embedding.weight"].shape
    tdepth = count_layers(sd, "transformer.resblocks.")
    ctx = sd["positional_embedding"].shape[0]
    # eot = vocab - 1: OpenAI/OpenCLIP pool at argmax(ids), and end-of-text is the largest id
    text = update(
        _clip_text(width=tw, depth=tdepth, heads=tw // head_width, vocab_size=vocab, context_length=ctx),
        mlp_ratio=mlp_ratio(tw, sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        act=act,
    )

    bias = sd.get("logit_bias")
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        vision=vision,
        text=text,
        init_logit_scale=float(sd["logit_scale"]) if "logit_scale" in sd else math.log(1 / 0.07),
        init_logit_bias=None if bias is None else float(bias),
    )


def _layers(depth: int, dst: str, src: str) -> Plan:
    plan: Plan = {}
    for i in range(depth):
        d, s = f"{dst}blocks.{i}.", f"{src}resblocks.{i}."
        plan |= linear_pairs(LAYER, d, s)
        plan[f"{d}attn.qkv.weight"] = copy(f"{s}attn.in_proj_weight")  # already q, k, v in order
        plan[f"{d}attn.qkv.bias"] = copy(f"{s}attn.in_proj_bias")
    return plan


def openclip_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: CLIPConfig) -> StateDict:
    """OpenAI / OpenCLIP ViT CLIP state dict -> state dict of ``mmlm.CLIP(cfg)``."""
    if cfg.share != "none":
        raise ConversionError("OpenAI/OpenCLIP CLIPs have two separate towers: convert into share='none'")
    W = cfg.vision.width
    plan: Plan = {
        # (W,) and (1 + N, W) in OpenAI's layout, (1, 1, W) and (1, 1 + N, W) in timm's
        "visual.cls_token": reshape("visual.class_embedding", 1, 1, W),
        "visual.pos_embed": reshape("visual.positional_embedding", 1, 1 + cfg.vision.grid_size**2, W),
        "visual.patch_embed.proj.weight": copy("visual.conv1.weight"),
        **linear_pairs(VISION, "visual.", "visual."),
        **_layers(cfg.vision.depth, "visual.", "visual.transformer."),
        "visual_projection.weight": transpose("visual.proj"),  # stored [in, out]
        "text.token_embed.weight": copy("token_embedding.weight"),
        "text.pos_embed": copy("positional_embedding"),
        **linear_pairs(TEXT, "text.", ""),
        **_layers(cfg.text.depth, "text.", "transformer."),
        "text_projection.weight": transpose("text_projection"),  # stored [in, out]
        "logit_scale": copy("logit_scale"),
    }
    if cfg.init_logit_bias is not None:
        plan["logit_bias"] = copy("logit_bias")
    return run_plan(sd, plan, DROP, source="OpenAI/OpenCLIP state dict")


# ------------------------------------------------------------------------------ mmlm -> OpenCLIP


def config_to_openclip(cfg: CLIPConfig) -> dict[str, Any]:
    """open_clip_config.json for an mmlm CLIP: ``model_cfg`` (``open_clip.CLIP``'s arguments) and
    ``preprocess_cfg``. Refuses, naming each, what OpenCLIP's ``CLIP`` cannot express."""
    t, v = cfg.text, cfg.vision
    problems = []
    if cfg.share != "none":
        problems.append(f"share={cfg.share!r}: OpenCLIP's CLIP has two separate towers; only share='none' exports")
    if "quick_gelu" in (v.act, t.act) and v.act != t.act:
        problems.append(f"activations vision {v.act!r}, text {t.act!r}: OpenCLIP's quick_gelu switch sets both towers")
    for name, c in (("vision", v), ("text", t)):
        if not c.pre_norm or not c.qkv_bias or not c.final_norm:
            problems.append(f"{name}: OpenCLIP's blocks are pre-LN with a qkv bias and a final LayerNorm")
    if not t.causal:
        problems.append("text: bidirectional attention (OpenCLIP's text tower would then attend to the padding)")
    if t.pool != "eot" or t.eot_token_id is None:
        problems.append(f"text: pool={t.pool!r} (OpenCLIP's text tower pools at the end-of-text token)")
    if t.pos_embed != "learned" or t.type_vocab_size or t.embed_norm:
        problems.append("text: OpenCLIP needs learned positions, no token types and no LayerNorm on the embeddings")
    if v.patch_bias or not v.class_token or v.num_classes or v.in_chans != 3:
        problems.append("vision: OpenCLIP needs a bias-free patch conv, a class token, no classifier head, 3 channels")
    if problems:
        raise ConversionError("cannot export this CLIP to OpenCLIP:\n  " + "\n  ".join(problems))

    def tower(c: TransformerConfig) -> dict[str, Any]:
        out: dict[str, Any] = {"width": c.width, "layers": c.depth, "mlp_ratio": c.mlp_ratio}
        if c.layer_scale is not None:
            out["ls_init_value"] = c.layer_scale
        if c.norm_eps != 1e-5:  # OpenCLIP's LayerNorm default
            out["norm_kwargs"] = {"eps": c.norm_eps}
        if c.act == "gelu_tanh":
            out["act_kwargs"] = {"approximate": "tanh"}  # nn.GELU's
        return out

    vision = {"image_size": v.image_size, "patch_size": v.patch_size, **tower(v), "head_width": v.width // v.heads}
    if not v.norm_pre:
        vision["no_ln_pre"] = True
    if v.pool == "gap":  # mean of the patch tokens, then the final LayerNorm
        vision |= {"pool_type": "avg", "final_ln_after_pool": True}
    if v.patch_dropout:
        vision["patch_dropout"] = v.patch_dropout
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, **tower(t), "heads": t.heads}
    if t.eot_token_id != t.vocab_size - 1:  # OpenCLIP's default pools at argmax(ids): eot must be the largest id
        text |= {"pool_type": "eos", "eos_id": t.eot_token_id}
    model_cfg: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": v.act == "quick_gelu",
        "vision_cfg": vision,
        "text_cfg": text,
    }
    if cfg.init_logit_bias is not None:  # creates open_clip's logit_bias parameter; the weights hold its value
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    preprocess_cfg = {
        "size": v.image_size, "mean": list(v.image_mean), "std": list(v.image_std),
        "interpolation": v.interpolation, "resize_mode": "shortest",
    }  # fmt: skip
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def _layers_to_openclip(c: TransformerConfig, dst: str, src: str) -> Plan:
    plan: Plan = {}
    for i in range(c.depth):
        d, s = f"{dst}resblocks.{i}.", f"{src}blocks.{i}."
        plan |= linear_pairs({theirs: ours for ours, theirs in LAYER.items()}, d, s)
        plan[f"{d}attn.in_proj_weight"] = copy(f"{s}attn.qkv.weight")
        plan[f"{d}attn.in_proj_bias"] = copy(f"{s}attn.qkv.bias")
        if c.layer_scale is not None:
            plan |= {f"{d}ls_1.gamma": copy(f"{s}ls1.gamma"), f"{d}ls_2.gamma": copy(f"{s}ls2.gamma")}
    return plan


def mmlm_to_openclip(sd: Mapping[str, torch.Tensor], cfg: CLIPConfig) -> StateDict:
    """State dict of ``mmlm.CLIP(cfg)`` -> state dict of ``open_clip.CLIP`` (the inverse of ``openclip_to_mmlm``)."""
    config_to_openclip(cfg)  # raises for what OpenCLIP cannot express
    v = cfg.vision
    vision_norms = {theirs: ours for ours, theirs in VISION.items() if v.norm_pre or ours != "norm_pre"}
    plan: Plan = {
        "visual.class_embedding": reshape("visual.cls_token", v.width),
        "visual.positional_embedding": reshape("visual.pos_embed", 1 + v.grid_size**2, v.width),
        "visual.conv1.weight": copy("visual.patch_embed.proj.weight"),
        **linear_pairs(vision_norms, "visual.", "visual."),
        **_layers_to_openclip(v, "visual.transformer.", "visual."),
        "visual.proj": transpose("visual_projection.weight"),  # stored [in, out]
        "token_embedding.weight": copy("text.token_embed.weight"),
        "positional_embedding": copy("text.pos_embed"),
        **linear_pairs({theirs: ours for ours, theirs in TEXT.items()}, "", "text."),
        **_layers_to_openclip(cfg.text, "transformer.", "text."),
        "text_projection": transpose("text_projection.weight"),  # stored [in, out]
        # OpenCLIP clamps logit_scale in its training loop, not in forward: export the value mmlm uses
        "logit_scale": Op(("logit_scale",), lambda s: s.clamp(0, cfg.max_logit_scale)),
    }
    if cfg.init_logit_bias is not None:
        plan["logit_bias"] = copy("logit_bias")
    return run_plan(sd, plan, source="mmlm CLIP state dict", target="OpenCLIP CLIP")
