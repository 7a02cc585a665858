"""OpenAI CLIP / OpenCLIP state dicts <-> mmlm ``CLIP``.

Both use ``nn.MultiheadAttention`` (q, k, v already fused in ``in_proj_weight``) and
store the two projections ``visual.proj`` / ``text_projection`` as [in, out] matrices
used as ``x @ proj``, so they are transposed into ``nn.Linear`` weights.

Nothing in the weights says how many attention heads there are or which activation
was trained. An OpenCLIP folder's open_clip_config.json does (``config_from_openclip``,
the inverse of ``config_to_openclip``); for a bare file, heads follow OpenAI's and
OpenCLIP's convention of 64-wide heads, and the activation is an argument (OpenAI
weights need ``quick_gelu``; OpenCLIP models trained from scratch mostly use ``gelu``,
those named ``*-quickgelu`` ``quick_gelu``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

# the preset builders hold what an OpenAI tower looks like; only the shapes are read off the file
from mmlm.config import (
    OPENAI_MEAN,
    OPENAI_STD,
    Activation,
    CLIPConfig,
    TransformerConfig,
    _clip_text,
    _clip_vision,
    update,
)
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
LAYER_SCALE = {"ls1": "ls_1", "ls2": "ls_2"}  # OpenCLIP's ls_init_value, a ``gamma`` each
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
# OpenCLIP's defaults (``CLIP``, ``CLIPTextCfg``, ``PreprocessCfg``) for what open_clip_config.json leaves out
OPENCLIP_LOGIT_SCALE = math.log(1 / 0.07)
OPENCLIP_TEXT_HEADS = 8
OPENCLIP_EOS_ID = 2
OPENCLIP_EPS = 1e-5
# OpenCLIP options mmlm's CLIP has no counterpart for, and the values at which they are off
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_PLAIN_BLOCK = {"block_type": (None, "default"), **dict.fromkeys(_CUSTOM_BLOCK, (False,))}
OFF: dict[str, dict[str, tuple[Any, ...]]] = {
    "model_cfg": {"custom_text": (False,), "multimodal_cfg": (None,), "nonscalar_logit_scale": (False,)},
    "vision_cfg": {
        "timm_model_name": (None,),
        "attentional_pool": (False,),
        "pos_embed_type": ("learnable",),
        **_PLAIN_BLOCK,
    },
    "text_cfg": {
        "hf_model_name": (None,),
        "embed_cls": (False,),
        "no_causal_mask": (False,),
        "proj_type": ("linear",),
        "proj_bias": (False,),
        **_PLAIN_BLOCK,
    },
}


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
        init_logit_scale=float(sd["logit_scale"]) if "logit_scale" in sd else OPENCLIP_LOGIT_SCALE,
        init_logit_bias=None if bias is None else float(bias),
    )


def config_from_openclip(
    oc_config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], act: Activation = "gelu"
) -> CLIPConfig:
    """open_clip_config.json + its weights -> the CLIP ``open_clip.CLIP(**model_cfg)`` builds; the inverse of
    ``config_to_openclip``.

    Shapes come from the tensors (``config_from_state_dict``) and must agree with the json, which tells
    the rest (heads, activation, eps, layer scale, pooling, preprocessing), OpenCLIP's defaults standing
    for what it leaves out. ``act`` is the activation ``quick_gelu`` selects; ``act_kwargs`` may turn
    GELU into its tanh form per tower. Options mmlm's CLIP has no counterpart for are refused by name.
    Fields OpenCLIP has no place for come back as a CLIP tower's defaults: ``dropout``, ``attn_dropout``,
    ``drop_path`` and ``init`` of both towers; ``mask_token_id``, ``max_seq_length`` and ``do_lower_case``
    of the text tower (MLM and ``TextEncoder.encode`` only); ``max_logit_scale`` (OpenCLIP's training loop
    clamps at ln 100).
    """
    model_cfg: Mapping[str, Any] = oc_config.get("model_cfg") or {}
    vcfg: Mapping[str, Any] = model_cfg.get("vision_cfg") or {}
    tcfg: Mapping[str, Any] = model_cfg.get("text_cfg") or {}
    pre: Mapping[str, Any] = oc_config.get("preprocess_cfg") or {}
    if problems := _cannot_hold(model_cfg, pre, act):
        raise ConversionError("mmlm's CLIP cannot hold this OpenCLIP model:\n  " + "\n  ".join(problems))

    cfg = config_from_state_dict(sd, act, head_width=vcfg.get("head_width", HEAD_WIDTH))
    v, t = cfg.vision, cfg.text
    vision_ratio, text_ratio = vcfg.get("mlp_ratio", v.mlp_ratio), tcfg.get("mlp_ratio", t.mlp_ratio)
    image_size = _side(vcfg.get("image_size", v.image_size))
    said_found = [  # what the json says (in its words, as a shape) and what the weights have
        ("embed_dim", model_cfg.get("embed_dim"), cfg.embed_dim),
        ("vision_cfg.width", vcfg.get("width"), v.width),
        ("vision_cfg.layers", vcfg.get("layers"), v.depth),
        ("vision_cfg.patch_size", _side(vcfg.get("patch_size")), v.patch_size),
        ("vision_cfg.image_size // patch_size", image_size // v.patch_size, v.grid_size),
        ("vision_cfg.width * mlp_ratio", int(v.width * vision_ratio), v.mlp_dim),
        ("text_cfg.width", tcfg.get("width"), t.width),
        ("text_cfg.layers", tcfg.get("layers"), t.depth),
        ("text_cfg.context_length", tcfg.get("context_length"), t.context_length),
        ("text_cfg.vocab_size", tcfg.get("vocab_size"), t.vocab_size),
        ("text_cfg.width * mlp_ratio", int(t.width * text_ratio), t.mlp_dim),
    ]
    wrong = [f"{name} = {said}, the weights {found}" for name, said, found in said_found if said not in (None, found)]
    if wrong:
        raise ConversionError("open_clip_config.json does not describe its weights:\n  " + "\n  ".join(wrong))
    if pre.get("resize_mode", "shortest") != "shortest":
        warnings.warn(
            f"OpenCLIP preprocesses this model with resize_mode={pre['resize_mode']!r}; mmlm's transforms resize the "
            "shortest side and centre-crop",
            stacklevel=2,
        )

    vision = update(
        v, heads=v.width // vcfg.get("head_width", HEAD_WIDTH), mlp_ratio=vision_ratio, image_size=image_size,
        act=_act(vcfg, act), norm_eps=_eps(vcfg), layer_scale=vcfg.get("ls_init_value"),
        norm_pre=not vcfg.get("no_ln_pre", False), pool="gap" if vcfg.get("pool_type") == "avg" else "cls",
        patch_dropout=vcfg.get("patch_dropout", 0.0),
        image_mean=tuple(pre.get("mean", OPENAI_MEAN)), image_std=tuple(pre.get("std", OPENAI_STD)),
        interpolation=pre.get("interpolation", "bicubic"),
    )  # fmt: skip
    text = update(
        t, heads=tcfg.get("heads", OPENCLIP_TEXT_HEADS), mlp_ratio=text_ratio, act=_act(tcfg, act),
        norm_eps=_eps(tcfg), layer_scale=tcfg.get("ls_init_value"), pad_token_id=tcfg.get("pad_id", 0),
        # argmax pools at the largest id, which config_from_state_dict made the end-of-text token
        eot_token_id=tcfg.get("eos_id", OPENCLIP_EOS_ID) if tcfg.get("pool_type") == "eos" else t.eot_token_id,
    )  # fmt: skip
    return CLIPConfig(
        embed_dim=cfg.embed_dim,
        vision=vision,
        text=text,
        init_logit_scale=model_cfg.get("init_logit_scale", OPENCLIP_LOGIT_SCALE),
        init_logit_bias=model_cfg.get("init_logit_bias"),
    )


def _cannot_hold(model_cfg: Mapping[str, Any], pre: Mapping[str, Any], act: Activation) -> list[str]:
    """Each option of an OpenCLIP config that mmlm's CLIP has no counterpart for, as ``key=value (why)``."""
    vcfg, tcfg = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    named = {"model_cfg": model_cfg, "vision_cfg": vcfg, "text_cfg": tcfg}
    problems = [
        f"{where}.{key}={c[key]!r}"
        for where, c in named.items()
        for key, off in OFF[where].items()
        if c.get(key, off[0]) not in off
    ]
    if isinstance(vcfg.get("layers"), (list, tuple)):
        problems.append(f"vision_cfg.layers={vcfg['layers']!r} (a ResNet image tower)")
    for key in ("image_size", "patch_size"):
        if isinstance(size := vcfg.get(key), (list, tuple)) and len(set(size)) != 1:
            problems.append(f"vision_cfg.{key}={size!r} (mmlm's ViT takes square images and patches)")
    pool = vcfg.get("pool_type", "tok")
    if pool not in ("tok", "avg") or (pool == "avg" and not vcfg.get("final_ln_after_pool")):
        # mmlm's gap normalises the mean of the patch tokens; OpenCLIP's avg alone averages normalised tokens
        problems.append(f"vision_cfg.pool_type={pool!r} (mmlm pools 'tok', or 'avg' with final_ln_after_pool)")
    if (pool := tcfg.get("pool_type", "argmax")) not in ("argmax", "eos"):
        problems.append(f"text_cfg.pool_type={pool!r} (mmlm pools at the end-of-text token: 'argmax' or 'eos')")
    for where in ("vision_cfg", "text_cfg"):
        acts = named[where].get("act_kwargs") or {}
        if acts not in ({}, {"approximate": "none"}, {"approximate": "tanh"}) or (acts and act == "quick_gelu"):
            problems.append(
                f"{where}.act_kwargs={acts!r} with quick_gelu={act == 'quick_gelu'} "
                "(mmlm has GELU, its tanh form and QuickGELU)"
            )
        if set(norms := named[where].get("norm_kwargs") or {}) - {"eps"}:
            problems.append(f"{where}.norm_kwargs={norms!r} (mmlm's LayerNorms take eps only)")
    if (interpolation := pre.get("interpolation", "bicubic")) not in ("bicubic", "bilinear"):
        problems.append(f"preprocess_cfg.interpolation={interpolation!r} (mmlm resizes bicubic or bilinear)")
    return problems


def _act(c: Mapping[str, Any], act: Activation) -> Activation:
    return "gelu_tanh" if (c.get("act_kwargs") or {}).get("approximate") == "tanh" else act


def _eps(c: Mapping[str, Any]) -> float:
    return (c.get("norm_kwargs") or {}).get("eps", OPENCLIP_EPS)


def _side(size: int | list[int] | None) -> int | None:
    """OpenCLIP takes an image or patch size as one int or a square [height, width]."""
    return size[0] if isinstance(size, (list, tuple)) else size


def _layers(c: TransformerConfig, dst: str, src: str) -> Plan:
    plan: Plan = {}
    for i in range(c.depth):
        d, s = f"{dst}blocks.{i}.", f"{src}resblocks.{i}."
        plan |= linear_pairs(LAYER, d, s)
        plan[f"{d}attn.qkv.weight"] = copy(f"{s}attn.in_proj_weight")  # already q, k, v in order
        plan[f"{d}attn.qkv.bias"] = copy(f"{s}attn.in_proj_bias")
        if c.layer_scale is not None:
            plan |= linear_pairs(LAYER_SCALE, d, s, params=("gamma",))
    return plan


def openclip_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: CLIPConfig) -> StateDict:
    """OpenAI / OpenCLIP ViT CLIP state dict -> state dict of ``mmlm.CLIP(cfg)``."""
    if cfg.share != "none":
        raise ConversionError("OpenAI/OpenCLIP CLIPs have two separate towers: convert into share='none'")
    v = cfg.vision
    W = v.width
    vision_norms = {ours: theirs for ours, theirs in VISION.items() if v.norm_pre or ours != "norm_pre"}
    plan: Plan = {
        # (W,) and (1 + N, W) in OpenAI's layout, (1, 1, W) and (1, 1 + N, W) in timm's
        "visual.cls_token": reshape("visual.class_embedding", 1, 1, W),
        "visual.pos_embed": reshape("visual.positional_embedding", 1, 1 + v.grid_size**2, W),
        "visual.patch_embed.proj.weight": copy("visual.conv1.weight"),
        **linear_pairs(vision_norms, "visual.", "visual."),
        **_layers(v, "visual.", "visual.transformer."),
        "visual_projection.weight": transpose("visual.proj"),  # stored [in, out]
        "text.token_embed.weight": copy("token_embedding.weight"),
        "text.pos_embed": copy("positional_embedding"),
        **linear_pairs(TEXT, "text.", ""),
        **_layers(cfg.text, "text.", "transformer."),
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
    if t.normalize:
        problems.append("text: normalize=True (OpenCLIP projects the pooled features as they are, not L2-normalised)")
    if v.patch_bias or not v.class_token or v.num_classes or v.in_chans != 3:
        problems.append("vision: OpenCLIP needs a bias-free patch conv, a class token, no classifier head, 3 channels")
    if problems:
        raise ConversionError("cannot export this CLIP to OpenCLIP:\n  " + "\n  ".join(problems))

    def tower(c: TransformerConfig) -> dict[str, Any]:
        out: dict[str, Any] = {"width": c.width, "layers": c.depth, "mlp_ratio": c.mlp_ratio}
        if c.layer_scale is not None:
            out["ls_init_value"] = c.layer_scale
        if c.norm_eps != OPENCLIP_EPS:
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
    if t.pad_token_id != 0:
        text["pad_id"] = t.pad_token_id
    model_cfg: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": v.act == "quick_gelu",
        "vision_cfg": vision,
        "text_cfg": text,
    }
    # initial values only (the weights hold the trained ones), kept so that the config reads back the same
    if cfg.init_logit_scale != OPENCLIP_LOGIT_SCALE:
        model_cfg["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:  # also creates open_clip's logit_bias parameter
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
            plan |= linear_pairs({theirs: ours for ours, theirs in LAYER_SCALE.items()}, d, s, params=("gamma",))
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
