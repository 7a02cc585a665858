"""OpenCLIP CoCa state dicts <-> mmlm ``CoCa``.

The towers convert as OpenCLIP's CLIP does (``mmlm.convert.openclip``), with four differences:

- the image tower's ``ln_post`` normalises the attentional pooler's output (mmlm's ``pool_norm``);
- the pooler's ``nn.MultiheadAttention`` keeps ``q/k/v_proj_weight`` apart when the image width
  differs from ``embed_dim`` and fuses them in ``in_proj_weight`` otherwise; both become ``q`` and
  ``kv`` Linears;
- the text tower's class token ``text.cls_emb`` is ``text_cls``;
- decoder layer i is ``text_decoder.resblocks.i`` (self-attention) and ``text_decoder.cross_attn.i``
  (cross-attention): mmlm's decoder blocks 2i and 2i + 1; the cross block's fused ``in_proj_weight``
  splits into ``q`` (first third) and ``kv``; ``text_decoder.text_projection`` [in, out] is ``lm_head``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mmlm.config import Activation, CoCaConfig, _clip_text, _clip_vision, update
from mmlm.convert.common import (
    ConversionError,
    Op,
    Plan,
    StateDict,
    cat,
    copy,
    count_layers,
    linear_pairs,
    mlp_ratio,
    reshape,
    run_plan,
    transpose,
)
from mmlm.convert.openclip import HEAD_WIDTH, LAYER, LAYER_SCALE, OPENCLIP_LOGIT_SCALE, _eps, _layers

DROP = ("attn_mask", "text.attn_mask", "text_decoder.attn_mask")  # causal masks, persistent in older versions
# OpenCLIP's defaults: CLIPVisionCfg.attn_pooler_heads, MultimodalCfg.heads, CLIPTextCfg.heads
OPENCLIP_POOL_HEADS = 8
OPENCLIP_HEADS = 8
SOT, EOT = 49406, 49407  # OpenCLIP's generate() defaults


def is_coca(sd: Mapping[str, torch.Tensor]) -> bool:
    return "text_decoder.text_projection" in sd


def _rows(src: str, start: int, stop: int | None) -> Op:
    """Rows [start, stop) of a fused projection (q, then k and v, along dim 0)."""
    return Op((src,), lambda w: w[start:stop].contiguous())


def config_from_openclip_coca(
    sd: Mapping[str, torch.Tensor], oc_config: Mapping[str, Any] | None = None, act: Activation = "gelu"
) -> CoCaConfig:
    """Shapes from the tensors; heads, eps, layer scale and the mask variant from open_clip_config.json's
    ``model_cfg`` when there is one (OpenCLIP's defaults otherwise: 64-wide image heads, 8 text, decoder and
    pooler heads, the legacy class-token mask)."""
    model_cfg: Mapping[str, Any] = (oc_config or {}).get("model_cfg") or {}
    vcfg: Mapping[str, Any] = model_cfg.get("vision_cfg") or {}
    tcfg: Mapping[str, Any] = model_cfg.get("text_cfg") or {}
    mcfg: Mapping[str, Any] = model_cfg.get("multimodal_cfg") or {}
    problems = [
        f"{where}.{key}={c[key]!r}"
        for where, c, key, off in (
            ("vision_cfg", vcfg, "attentional_pool", (True,)),
            ("vision_cfg", vcfg, "timm_model_name", (None,)),
            ("text_cfg", tcfg, "hf_model_name", (None,)),
            ("vision_cfg", vcfg, "pos_embed_type", ("learnable",)),
        )
        if key in c and c[key] not in off
    ]
    if problems:
        raise ConversionError("mmlm's CoCa cannot hold this OpenCLIP model:\n  " + "\n  ".join(problems))
    if not is_coca(sd) or "visual.attn_pool.query" not in sd:
        raise ConversionError("not an OpenCLIP CoCa state dict (no text_decoder.text_projection / visual.attn_pool)")
    vw, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    vision = update(
        _clip_vision(patch, width=vw, depth=count_layers(sd, "visual.transformer.resblocks."),
                     heads=vw // vcfg.get("head_width", HEAD_WIDTH), image_size=grid * patch),
        mlp_ratio=mlp_ratio(vw, sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        act=act, final_norm=False, norm_eps=_eps(vcfg), layer_scale=vcfg.get("ls_init_value"),
        norm_pre=not vcfg.get("no_ln_pre", False),
    )  # fmt: skip
    vocab, tw = sd["text.token_embedding.weight"].shape
    positions = sd["text.positional_embedding"].shape[0]  # the text's context + the class token
    text = update(
        _clip_text(width=tw, depth=count_layers(sd, "text.transformer.resblocks."), heads=tcfg.get("heads", OPENCLIP_HEADS),
                   vocab_size=vocab, context_length=positions),
        mlp_ratio=mlp_ratio(tw, sd["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        act=act, norm_eps=_eps(tcfg), layer_scale=tcfg.get("ls_init_value"), max_seq_length=positions - 1,
        pad_token_id=tcfg.get("pad_id", 0),
    )  # fmt: skip
    dw, dvocab = sd["text_decoder.text_projection"].shape
    decoder = update(
        _clip_text(width=dw, depth=count_layers(sd, "text_decoder.resblocks."), heads=mcfg.get("heads", OPENCLIP_HEADS),
                   vocab_size=dvocab, context_length=mcfg.get("context_length", positions - 1)),
        mlp_ratio=mlp_ratio(dw, sd["text_decoder.resblocks.0.mlp.c_fc.weight"].shape[0]),
        act=act, norm_eps=_eps(mcfg), layer_scale=mcfg.get("ls_init_value"),
    )  # fmt: skip
    if oc_config is not None:  # initial values as the json says (the weights hold the trained ones)
        scale, bias = model_cfg.get("init_logit_scale", OPENCLIP_LOGIT_SCALE), model_cfg.get("init_logit_bias")
    else:
        scale = float(sd["logit_scale"]) if "logit_scale" in sd else OPENCLIP_LOGIT_SCALE
        bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    return CoCaConfig(
        embed_dim=sd["visual.proj"].shape[1],
        vision=vision,
        text=text,
        decoder=decoder,
        pool_queries=sd["visual.attn_pool.query"].shape[0],
        pool_heads=vcfg.get("attn_pooler_heads", OPENCLIP_POOL_HEADS),
        legacy_cls_mask=not tcfg.get("correct_cls_mask", False),
        init_logit_scale=scale,
        init_logit_bias=bias,
    )


def _pooler(sd: Mapping[str, Any], E: int) -> Plan:
    s = "visual.attn_pool."
    plan: Plan = {
        "attn_pool.query": copy(f"{s}query"),
        **linear_pairs({"norm_q": "ln_q", "norm_kv": "ln_k", "attn.proj": "attn.out_proj"}, "attn_pool.", s),
        "attn_pool.attn.q.bias": _rows(f"{s}attn.in_proj_bias", 0, E),
        "attn_pool.attn.kv.bias": _rows(f"{s}attn.in_proj_bias", E, None),
    }
    if f"{s}attn.in_proj_weight" in sd:  # image width == embed_dim: nn.MultiheadAttention fuses q, k, v
        plan["attn_pool.attn.q.weight"] = _rows(f"{s}attn.in_proj_weight", 0, E)
        plan["attn_pool.attn.kv.weight"] = _rows(f"{s}attn.in_proj_weight", E, None)
    else:
        plan["attn_pool.attn.q.weight"] = copy(f"{s}attn.q_proj_weight")
        plan["attn_pool.attn.kv.weight"] = cat(f"{s}attn.k_proj_weight", f"{s}attn.v_proj_weight")
    return plan


def _decoder(cfg: CoCaConfig) -> Plan:
    W = cfg.decoder.width
    ls = cfg.decoder.layer_scale is not None
    plan: Plan = {}
    for i in range(cfg.decoder.depth):
        d, s = f"decoder.{2 * i}.", f"text_decoder.resblocks.{i}."  # self-attention
        plan |= linear_pairs(LAYER, d, s)
        plan[f"{d}attn.qkv.weight"] = copy(f"{s}attn.in_proj_weight")
        plan[f"{d}attn.qkv.bias"] = copy(f"{s}attn.in_proj_bias")
        if ls:
            plan |= linear_pairs(LAYER_SCALE, d, s, params=("gamma",))
        d, s = f"decoder.{2 * i + 1}.", f"text_decoder.cross_attn.{i}."  # cross-attention to the image tokens
        plan |= linear_pairs({**LAYER, "norm1_kv": "ln_1_kv"}, d, s)
        for p in ("weight", "bias"):
            plan[f"{d}attn.q.{p}"] = _rows(f"{s}attn.in_proj_{p}", 0, W)
            plan[f"{d}attn.kv.{p}"] = _rows(f"{s}attn.in_proj_{p}", W, None)
        if ls:
            plan |= linear_pairs(LAYER_SCALE, d, s, params=("gamma",))
    return plan


def openclip_coca_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: CoCaConfig) -> StateDict:
    """OpenCLIP ``CoCa`` state dict -> state dict of ``mmlm.models.CoCa(cfg)``."""
    if cfg.share != "none":
        raise ConversionError("OpenCLIP's CoCa has two separate towers: convert into share='none'")
    return run_plan(sd, _plan(sd, cfg), DROP, source="OpenCLIP CoCa state dict")


# ------------------------------------------------------------------------------ mmlm -> OpenCLIP


def config_to_openclip_coca(cfg: CoCaConfig) -> dict[str, Any]:
    """open_clip_config.json (``model_cfg`` = ``open_clip.CoCa``'s arguments, ``preprocess_cfg``) for an mmlm CoCa;
    refuses, naming each, what OpenCLIP's CoCa cannot express."""
    v, t, d = cfg.vision, cfg.text, cfg.decoder
    problems = []
    if cfg.share != "none":
        problems.append(f"share={cfg.share!r}: OpenCLIP's CoCa has two separate towers")
    if len({v.act, t.act, d.act}) != 1 or v.act == "gelu_tanh":
        problems.append(f"activations {v.act!r}, {t.act!r}, {d.act!r}: OpenCLIP's quick_gelu switch sets all three")
    if cfg.embed_dim != d.width:
        problems.append(
            f"embed_dim {cfg.embed_dim} != decoder width {d.width}: OpenCLIP's cross-attention needs both equal"
        )
    if v.pool != "cls" or v.final_norm:
        problems.append("the image tower must pool 'cls' without a final norm (the pooler's norm is ln_post)")
    for name, c in (("vision", v), ("text", t), ("decoder", d)):
        if not c.pre_norm or not c.qkv_bias:
            problems.append(f"{name}: OpenCLIP's blocks are pre-LN with a qkv bias")
    if not cfg.legacy_cls_mask:
        problems.append(
            "legacy_cls_mask=False: open_clip's configs build CoCa's original (legacy) class-token mask only"
        )
    if t.pad_token_id != 0:
        problems.append(f"text.pad_token_id={t.pad_token_id}: OpenCLIP's CoCa pads with 0")
    if problems:
        raise ConversionError("OpenCLIP's CoCa cannot express this model:\n  " + "\n  ".join(problems))

    def tower(c: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"width": c.width, "layers": c.depth, "mlp_ratio": c.mlp_ratio}
        if c.layer_scale is not None:
            out["ls_init_value"] = c.layer_scale
        if c.norm_eps != 1e-5:
            out["norm_kwargs"] = {"eps": c.norm_eps}
        return out

    vision = {
        "image_size": v.image_size, "patch_size": v.patch_size, **tower(v), "head_width": v.width // v.heads,
        "attentional_pool": True, "attn_pooler_queries": cfg.pool_queries, "attn_pooler_heads": cfg.pool_heads,
        "output_tokens": True,
    }  # fmt: skip
    if not v.norm_pre:
        vision["no_ln_pre"] = True
    text = {
        "context_length": cfg.max_text_length, "vocab_size": t.vocab_size, **tower(t), "heads": t.heads,
        "embed_cls": True, "output_tokens": True,
    }  # fmt: skip
    multimodal = {"context_length": d.context_length, "vocab_size": d.vocab_size, **tower(d), "heads": d.heads,
                  "attn_pooler_heads": cfg.pool_heads}  # fmt: skip
    model_cfg: dict[str, Any] = {
        "embed_dim": cfg.embed_dim, "quick_gelu": v.act == "quick_gelu", "vision_cfg": vision, "text_cfg": text,
        "multimodal_cfg": multimodal, "custom_text": True,
    }  # fmt: skip
    if cfg.init_logit_scale != OPENCLIP_LOGIT_SCALE:
        model_cfg["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    preprocess_cfg = {
        "size": v.image_size, "mean": list(v.image_mean), "std": list(v.image_std),
        "interpolation": v.interpolation, "resize_mode": "shortest",
    }  # fmt: skip
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def mmlm_to_openclip_coca(sd: Mapping[str, torch.Tensor], cfg: CoCaConfig) -> StateDict:
    """State dict of ``mmlm.models.CoCa(cfg)`` -> state dict of ``open_clip.CoCa`` (inverse of ``openclip_coca_to_mmlm``).

    The forward plan is read backwards: each of its targets is a rename, a transpose, a reshape, rows of
    a fused OpenCLIP projection (put together again in order) or OpenCLIP's separate k and v (split again).
    """
    config_to_openclip_coca(cfg)  # raises for what OpenCLIP cannot express
    v, E = cfg.vision, cfg.embed_dim
    layout = {"visual.attn_pool.attn.in_proj_weight"} if v.width == E else set()  # how OpenCLIP will build its pooler
    inverse: Plan = {}
    rows: dict[str, list[str]] = {}  # OpenCLIP's fused tensor -> the mmlm tensors holding its rows, in order
    for ours, op in _plan(layout, cfg).items():
        if len(op.sources) == 2:  # kv = cat(k_proj_weight, v_proj_weight)
            inverse[op.sources[0]], inverse[op.sources[1]] = _rows(ours, 0, E), _rows(ours, E, None)
            continue
        (theirs,) = op.sources
        if ours.endswith((".q.weight", ".q.bias", ".kv.weight", ".kv.bias")):
            rows.setdefault(theirs, []).append(ours)
        elif theirs in ("visual.proj", "text.text_projection", "text_decoder.text_projection"):
            inverse[theirs] = transpose(ours)  # stored [in, out]
        elif theirs == "visual.class_embedding":
            inverse[theirs] = reshape(ours, v.width)
        elif theirs == "visual.positional_embedding":
            inverse[theirs] = reshape(ours, 1 + v.grid_size**2, v.width)
        else:
            inverse[theirs] = copy(ours)
    for theirs, parts in rows.items():
        inverse[theirs] = cat(*sorted(parts, key=lambda p: ".kv." in p))  # q rows first
    # OpenCLIP clamps logit_scale in its training loop, not in forward: export the value mmlm uses
    inverse["logit_scale"] = Op(("logit_scale",), lambda s: s.clamp(0, cfg.max_logit_scale))
    return run_plan(sd, inverse, source="mmlm CoCa state dict", target="OpenCLIP CoCa")


def _plan(sd: Mapping[str, Any], cfg: CoCaConfig) -> Plan:
    """The plan ``openclip_coca_to_mmlm`` runs; ``sd``'s keys tell how OpenCLIP stored the pooler's projections."""
    v = cfg.vision
    plan: Plan = {
        "visual.cls_token": reshape("visual.class_embedding", 1, 1, v.width),
        "visual.pos_embed": reshape("visual.positional_embedding", 1, 1 + v.grid_size**2, v.width),
        "visual.patch_embed.proj.weight": copy("visual.conv1.weight"),
        **(linear_pairs({"norm_pre": "ln_pre"}, "visual.", "visual.") if v.norm_pre else {}),
        **_layers(v, "visual.", "visual.transformer."),
        **_pooler(sd, cfg.embed_dim),
        **linear_pairs({"pool_norm": "visual.ln_post"}, "", ""),
        "visual_projection.weight": transpose("visual.proj"),
        "text.token_embed.weight": copy("text.token_embedding.weight"),
        "text.pos_embed": copy("text.positional_embedding"),
        "text_cls": copy("text.cls_emb"),
        **linear_pairs({"norm": "ln_final"}, "text.", "text."),
        **_layers(cfg.text, "text.", "text.transformer."),
        "text_projection.weight": transpose("text.text_projection"),
        **_decoder(cfg),
        **linear_pairs({"decoder_norm": "text_decoder.ln_final"}, "", ""),
        "lm_head.weight": transpose("text_decoder.text_projection"),
        "logit_scale": copy("logit_scale"),
    }
    if cfg.init_logit_bias is not None:
        plan["logit_bias"] = copy("logit_bias")
    return plan
