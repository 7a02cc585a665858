"""timm ``VisionTransformer`` -> mmlm ``VisionTransformer``.

mmlm's ViT uses timm's parameter names, so this is nearly the identity: the one rename
is timm's ``fc_norm`` (the LayerNorm after average pooling), which is mmlm's ``norm``
under ``pool="gap"``. What the plain state dict cannot tell (heads, eps, activation) comes
from the timm model itself when its name is known (a timm hub folder's config.json),
otherwise from timm's defaults: 64-wide heads, eps 1e-6, exact GELU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmlm.config import HALF, VisionConfig
from mmlm.convert.common import (
    ConversionError,
    Plan,
    StateDict,
    copy,
    count_layers,
    linear_pairs,
    mlp_ratio,
    run_plan,
)

LAYER = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
HEAD_WIDTH = 64
TIMM_ACTS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}


def config_from_state_dict(sd: Mapping[str, torch.Tensor], head_width: int = HEAD_WIDTH) -> VisionConfig:
    """Shapes read off the tensors; heads assume ``head_width`` (true of timm's ti/s/b/l ViTs)."""
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise ConversionError("not a timm ViT state dict (no patch_embed.proj.weight / blocks.0.attn.qkv.weight)")
    width, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    prefix = int("cls_token" in sd)
    grid = math.isqrt(sd["pos_embed"].shape[1] - prefix)
    gap = "fc_norm.weight" in sd
    return VisionConfig(
        width=width, depth=count_layers(sd, "blocks."), heads=width // head_width,
        mlp_ratio=mlp_ratio(width, sd["blocks.0.mlp.fc1.weight"].shape[0]), act="gelu", norm_eps=1e-6,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, layer_scale=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        image_size=grid * patch, patch_size=patch, in_chans=in_chans, patch_bias="patch_embed.proj.bias" in sd,
        class_token=bool(prefix), norm_pre="norm_pre.weight" in sd, final_norm=gap or "norm.weight" in sd,
        pool="gap" if gap else "cls", num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        image_mean=HALF, image_std=HALF,
    )  # fmt: skip


def config_from_timm(model: nn.Module, pretrained_cfg: Mapping[str, Any] | None = None) -> VisionConfig:
    """Read the config off a timm ``VisionTransformer`` instance (build it on the meta device: no memory)."""
    from timm.layers import LayerScale

    blk = model.blocks[0]
    unsupported = {
        "register tokens": getattr(model, "num_reg_tokens", 0),
        "no_embed_class": getattr(model, "no_embed_class", False),
        "attention pooling (global_pool='map')": getattr(model, "attn_pool", None) is not None,
        "qk_norm": not isinstance(getattr(blk.attn, "q_norm", nn.Identity()), nn.Identity),
    }
    bad = [name for name, on in unsupported.items() if on]
    gap = model.global_pool == "avg"
    if gap and isinstance(model.fc_norm, nn.Identity) and not isinstance(model.norm, nn.Identity):
        bad.append("global_pool='avg' with the norm before pooling (fc_norm=False)")
    if model.global_pool not in ("token", "avg"):
        bad.append(f"global_pool={model.global_pool!r}")
    if bad:
        raise ConversionError(f"this timm ViT uses {', '.join(bad)}, which mmlm's VisionTransformer lacks")
    act = blk.mlp.act
    if isinstance(act, nn.GELU):
        act_name = "gelu_tanh" if act.approximate == "tanh" else "gelu"
    elif type(act).__name__ in TIMM_ACTS:  # timm's own activation classes, e.g. for act_layer="quick_gelu"
        act_name = TIMM_ACTS[type(act).__name__]
    else:
        raise ConversionError(f"activation {type(act).__name__} has no mmlm equivalent")
    norm = model.fc_norm if gap else model.norm
    pre = dict(pretrained_cfg or getattr(model, "pretrained_cfg", None) or {})
    return VisionConfig(
        width=model.embed_dim, depth=len(model.blocks), heads=blk.attn.num_heads,
        mlp_ratio=mlp_ratio(model.embed_dim, blk.mlp.fc1.out_features), act=act_name,
        norm_eps=blk.norm1.eps, qkv_bias=blk.attn.qkv.bias is not None,
        layer_scale=1e-5 if isinstance(blk.ls1, LayerScale) else None,  # an init value: the loaded gamma replaces it
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels, patch_bias=model.patch_embed.proj.bias is not None,
        class_token=model.cls_token is not None, norm_pre=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not isinstance(norm, nn.Identity), pool="gap" if gap else "cls", num_classes=model.num_classes,
        image_mean=tuple(pre.get("mean", HALF)), image_std=tuple(pre.get("std", HALF)),
        interpolation="bilinear" if pre.get("interpolation") == "bilinear" else "bicubic",
    )  # fmt: skip


def timm_vit_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> StateDict:
    """timm ViT state dict -> state dict of ``mmlm.VisionTransformer(cfg)``.

    With ``cfg.num_classes == 0`` a classifier in the checkpoint is dropped on purpose
    (loading the backbone only).
    """
    params = ("weight", "bias")
    plan: Plan = {
        "pos_embed": copy("pos_embed"),
        **linear_pairs({"patch_embed.proj": "patch_embed.proj"}, "", "", params if cfg.patch_bias else ("weight",)),
    }
    if cfg.class_token:
        plan["cls_token"] = copy("cls_token")
    if cfg.norm_pre:
        plan |= linear_pairs({"norm_pre": "norm_pre"}, "", "")
    if cfg.final_norm:
        # under average pooling timm normalises the pooled vector with fc_norm; mmlm's norm does that job
        plan |= linear_pairs({"norm": "fc_norm" if cfg.pool == "gap" else "norm"}, "", "")
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        plan |= linear_pairs({n: n for n in LAYER if n != "attn.qkv"}, b, b)
        plan |= linear_pairs({"attn.qkv": "attn.qkv"}, b, b, params if cfg.qkv_bias else ("weight",))
        if cfg.layer_scale is not None:
            plan |= {f"{b}ls1.gamma": copy(f"{b}ls1.gamma"), f"{b}ls2.gamma": copy(f"{b}ls2.gamma")}
    drop: tuple[str, ...] = ()
    if cfg.num_classes:
        plan |= linear_pairs({"head": "head"}, "", "")
    else:
        drop = ("head.weight", "head.bias")
    return run_plan(sd, plan, drop, source="timm ViT state dict")
