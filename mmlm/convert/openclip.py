"""OpenAI CLIP / OpenCLIP state dicts -> mmlm ``CLIP``.

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

import torch

# the preset builders hold what an OpenAI tower looks like; only the shapes are read off the file
from mmlm.config import Activation, CLIPConfig, _clip_text, _clip_vision, update
from mmlm.convert.common import (
    ConversionError,
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
        **linear_pairs({"norm_pre": "ln_pre", "norm": "ln_post"}, "visual.", "visual."),
        **_layers(cfg.vision.depth, "visual.", "visual.transformer."),
        "visual_projection.weight": transpose("visual.proj"),  # stored [in, out]
        "text.token_embed.weight": copy("token_embedding.weight"),
        "text.pos_embed": copy("positional_embedding"),
        **linear_pairs({"norm": "ln_final"}, "text.", ""),
        **_layers(cfg.text.depth, "text.", "transformer."),
        "text_projection.weight": transpose("text_projection"),  # stored [in, out]
        "logit_scale": copy("logit_scale"),
    }
    if cfg.init_logit_bias is not None:
        plan["logit_bias"] = copy("logit_bias")
    return run_plan(sd, plan, DROP, source="OpenAI/OpenCLIP state dict")
