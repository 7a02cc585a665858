"""timm ``VisionTransformer`` <-> mmlm ``VisionTransformer``.

mmlm's ViT uses timm's parameter names, so the key map is nearly the identity, one table
run both ways: the one rename is timm's ``fc_norm`` (the LayerNorm after average pooling),
which is mmlm's ``norm`` under ``pool="gap"``. What the plain state dict cannot tell (heads,
eps, activation) comes from the timm model itself when its name is known (a timm hub folder's
config.json), otherwise from timm's defaults: 64-wide heads, eps 1e-6, exact GELU. The other
way, ``hub_config`` names the registered timm model closest to an mmlm config and passes the
rest as ``model_args``.
"""

from __future__ import annotations

import inspect
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


# Registered timm ViTs that an exported config can name, with what each one fixes (LayerNorm eps
# and constructor arguments, as in timm/models/vision_transformer.py). The eps is the one thing
# config.json cannot pass, so it picks the family: 1e-6 plain ViTs, 1e-5 CLIP image towers.
_CLIP = {"pre_norm": True}
_CLIP_QUICKGELU = {"pre_norm": True, "act_layer": "quick_gelu"}
TIMM_NAMES: dict[str, tuple[float, dict[str, Any]]] = {
    name: (eps, {"patch_size": patch, "embed_dim": width, "depth": depth, "num_heads": heads, **more})
    for name, eps, patch, width, depth, heads, more in [
        ("vit_tiny_patch16_224", 1e-6, 16, 192, 12, 3, {}),
        ("vit_small_patch16_224", 1e-6, 16, 384, 12, 6, {}),
        ("vit_small_patch32_224", 1e-6, 32, 384, 12, 6, {}),
        ("vit_base_patch8_224", 1e-6, 8, 768, 12, 12, {}),
        ("vit_base_patch16_224", 1e-6, 16, 768, 12, 12, {}),
        ("vit_base_patch32_224", 1e-6, 32, 768, 12, 12, {}),
        ("vit_large_patch16_224", 1e-6, 16, 1024, 24, 16, {}),
        ("vit_large_patch32_224", 1e-6, 32, 1024, 24, 16, {}),
        ("vit_huge_patch14_224", 1e-6, 14, 1280, 32, 16, {}),
        ("vit_base_patch32_clip_224", 1e-5, 32, 768, 12, 12, _CLIP),
        ("vit_base_patch16_clip_224", 1e-5, 16, 768, 12, 12, _CLIP),
        ("vit_large_patch14_clip_224", 1e-5, 14, 1024, 24, 16, _CLIP),
        ("vit_huge_patch14_clip_224", 1e-5, 14, 1280, 32, 16, _CLIP),
        ("vit_base_patch32_clip_quickgelu_224", 1e-5, 32, 768, 12, 12, _CLIP_QUICKGELU),
        ("vit_base_patch16_clip_quickgelu_224", 1e-5, 16, 768, 12, 12, _CLIP_QUICKGELU),
        ("vit_large_patch14_clip_quickgelu_224", 1e-5, 14, 1024, 24, 16, _CLIP_QUICKGELU),
        ("vit_huge_patch14_clip_quickgelu_224", 1e-5, 14, 1280, 32, 16, _CLIP_QUICKGELU),
    ]
}
TIMM_ACT_LAYERS: dict[str, str | None] = {"gelu": None, "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def hub_config(cfg: VisionConfig) -> dict[str, Any]:
    """The config.json of a timm hub folder holding ``cfg``'s weights, as timm's ``save_for_hf`` lays it out.

    ``architecture`` is the registered name closest in width (then needing the fewest
    overrides); ``model_args`` holds what that name does not fix. ``pretrained_cfg`` describes
    mmlm's eval transform: resize the short side to ``image_size``, centre crop (crop_pct 1).
    Raises ``ConversionError`` naming whatever timm's ``VisionTransformer`` cannot express.
    """
    from timm.models import VisionTransformer

    problems = []
    if not cfg.pre_norm:
        problems.append("post-LN blocks (pre_norm=False)")
    if cfg.patch_bias == cfg.norm_pre:  # timm: PatchEmbed(bias=not pre_norm)
        problems.append(
            f"a patch embedding {'with' if cfg.patch_bias else 'without'} bias {'and' if cfg.norm_pre else 'but no'} "
            "norm_pre (timm has the bias exactly when it has no norm_pre)"
        )
    named = {name: fixed for name, (eps, fixed) in TIMM_NAMES.items() if eps == cfg.norm_eps}
    if not named:
        problems.append(f"LayerNorm eps {cfg.norm_eps:g} (timm's ViTs use 1e-6, its CLIP image towers 1e-5)")
    if problems:
        raise ConversionError(f"timm's VisionTransformer cannot express {'; '.join(problems)}")
    args = {
        "img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans, "embed_dim": cfg.width,
        "depth": cfg.depth, "num_heads": cfg.heads, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias,
        "init_values": cfg.layer_scale or None,  # only switches LayerScale on: the gammas are in the weights
        "class_token": cfg.class_token, "global_pool": "avg" if cfg.pool == "gap" else "token",
        "pre_norm": cfg.norm_pre, "final_norm": cfg.final_norm, "act_layer": TIMM_ACT_LAYERS[cfg.act],
    }  # fmt: skip
    defaults = {k: p.default for k, p in inspect.signature(VisionTransformer).parameters.items()}

    def overrides(name: str) -> dict[str, Any]:
        fixed = defaults | named[name]
        return {k: v for k, v in args.items() if fixed[k] != v}

    name = min(named, key=lambda n: (abs(math.log(cfg.width / named[n]["embed_dim"])), len(overrides(n))))
    return {
        "architecture": name,
        "num_classes": cfg.num_classes,
        "num_features": cfg.width,
        "global_pool": args["global_pool"],
        "model_args": overrides(name),
        "pretrained_cfg": {
            "custom_load": False,  # a native timm state dict, whatever the name's own weights are
            "input_size": [cfg.in_chans, cfg.image_size, cfg.image_size],
            "fixed_input_size": True,
            "interpolation": cfg.interpolation,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(cfg.image_mean),
            "std": list(cfg.image_std),
            "num_classes": cfg.num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def _plan(cfg: VisionConfig) -> Plan:
    """mmlm key -> the timm key it copies. Every entry is a rename, so the one table runs both ways."""
    plan: Plan = {"pos_embed": copy("pos_embed"), "patch_embed.proj.weight": copy("patch_embed.proj.weight")}
    if cfg.patch_bias:
        plan["patch_embed.proj.bias"] = copy("patch_embed.proj.bias")
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
        plan |= linear_pairs({"attn.qkv": "attn.qkv"}, b, b, ("weight", "bias") if cfg.qkv_bias else ("weight",))
        if cfg.layer_scale:
            plan |= {f"{b}ls1.gamma": copy(f"{b}ls1.gamma"), f"{b}ls2.gamma": copy(f"{b}ls2.gamma")}
    if cfg.num_classes:
        plan |= linear_pairs({"head": "head"}, "", "")
    return plan


def timm_vit_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> StateDict:
    """timm ViT state dict -> state dict of ``mmlm.VisionTransformer(cfg)``.

    With ``cfg.num_classes == 0`` a classifier in the checkpoint is dropped on purpose
    (loading the backbone only).
    """
    drop = () if cfg.num_classes else ("head.weight", "head.bias")
    return run_plan(sd, _plan(cfg), drop, source="timm ViT state dict")


def mmlm_to_timm_vit(sd: Mapping[str, torch.Tensor], cfg: VisionConfig) -> StateDict:
    """State dict of ``mmlm.VisionTransformer(cfg)`` -> timm's ``VisionTransformer`` keys (the inverse map)."""
    inverse = {op.sources[0]: copy(ours) for ours, op in _plan(cfg).items()}
    return run_plan(sd, inverse, source="mmlm VisionTransformer state dict", target="timm")
