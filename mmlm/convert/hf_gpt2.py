"""Hugging Face GPT-2 (``GPT2Model``, ``GPT2LMHeadModel``) <-> mmlm.

GPT-2's ``Conv1D`` layers store weights [in, out] (the transpose of ``nn.Linear``);
``c_attn`` is already q, k, v fused in that order. The LM head is tied to ``wte`` and
becomes mmlm's parameter-free ``CLMHead``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmlm.config import TextConfig, TextHead
from mmlm.convert.common import (
    ConversionError,
    Plan,
    StateDict,
    act_from_hf,
    check_tied,
    copy,
    linear_pairs,
    mlp_ratio,
    run_plan,
    strip_prefix,
    transpose,
)

NORMS = {"norm1": "ln_1", "norm2": "ln_2"}
CONV1D = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}  # the same ops as mmlm's


def config_from_hf(hf: Mapping[str, Any]) -> TextConfig:
    """mmlm ``TextConfig`` for a HF ``GPT2Config`` dict (``mask_token_id``, if there, as ``config_to_hf`` writes it)."""
    import transformers

    c = transformers.GPT2Config(**{k: v for k, v in hf.items() if k != "model_type"})
    if c.scale_attn_by_inverse_layer_idx:
        raise ConversionError("scale_attn_by_inverse_layer_idx=True has no mmlm equivalent")
    if not c.scale_attn_weights:
        raise ConversionError("scale_attn_weights=False (unscaled attention) has no mmlm equivalent")
    eot = c.eos_token_id if c.eos_token_id is not None else c.vocab_size - 1
    return TextConfig(
        width=c.n_embd, depth=c.n_layer, heads=c.n_head,
        mlp_ratio=mlp_ratio(c.n_embd, c.n_inner or 4 * c.n_embd), act=act_from_hf(c.activation_function),
        norm_eps=c.layer_norm_epsilon, pre_norm=True, qkv_bias=True, dropout=c.resid_pdrop, attn_dropout=c.attn_pdrop,
        vocab_size=c.vocab_size, context_length=c.n_positions, causal=True, pool="last",
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else eot, eot_token_id=eot,
        mask_token_id=hf.get("mask_token_id"), init="gpt2",
    )  # fmt: skip


def config_to_hf(cfg: TextConfig) -> dict[str, Any]:
    """``GPT2Config`` arguments for ``cfg``, the inverse of ``config_from_hf``; refuses what GPT-2 cannot express."""
    misfits = [why for bad, why in (
        (not cfg.causal, "bidirectional attention (a BERT-shaped model exports as BERT)"),
        (not cfg.pre_norm, "post-LN blocks (GPT-2 is pre-LN)"),
        (cfg.embed_norm, "a LayerNorm after the embeddings"),
        (not cfg.final_norm, "no LayerNorm after the last block"),
        (cfg.pos_embed != "learned", f"{cfg.pos_embed} positions"),
        (cfg.type_vocab_size > 0, "token-type embeddings"),
        (not cfg.qkv_bias, "no qkv bias"),
        (cfg.layer_scale is not None, "LayerScale"),
        (cfg.pool == "eot", "pool='eot', a CLIP-style text tower (export the CLIP it belongs to as CLIPModel)"),
        (cfg.pool in ("cls", "mean"), f"pool={cfg.pool!r} (GPT-2 reads the last token)"),
    ) if bad]  # fmt: skip
    if misfits:
        raise ConversionError("transformers' GPT-2 cannot express this text model: " + "; ".join(misfits))
    return dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.width, n_layer=cfg.depth,
        n_head=cfg.heads, n_inner=cfg.mlp_dim, activation_function=HF_ACT[cfg.act], layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
        bos_token_id=cfg.eot_token_id, eos_token_id=cfg.eot_token_id, pad_token_id=cfg.pad_token_id,
        **({"mask_token_id": cfg.mask_token_id} if cfg.mask_token_id is not None else {}),
    )  # fmt: skip


def has_lm_head(sd: Mapping[str, torch.Tensor], hf: Mapping[str, Any]) -> bool:
    """Whether the checkpoint is an LM (its tied head is usually not saved, so ask the config too)."""
    return "lm_head.weight" in sd or any(a.endswith("LMHeadModel") for a in hf.get("architectures") or ())


def hf_gpt2_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: TextConfig, heads: tuple[TextHead, ...] = ()) -> StateDict:
    """GPT-2 state dict -> state dict of ``TextEncoder(cfg)``, or ``TextWithHeads`` with ``heads=("clm",)``."""
    sd = strip_prefix(sd, "transformer.")
    if "clm" in heads:
        check_tied(sd, "lm_head.weight", "wte.weight")
    enc = "encoder." if heads else ""
    plan: Plan = {
        f"{enc}token_embed.weight": copy("wte.weight"),
        f"{enc}pos_embed": copy("wpe.weight"),
        **linear_pairs({"norm": "ln_f"}, enc, ""),
    }
    for i in range(cfg.depth):
        d, s = f"{enc}blocks.{i}.", f"h.{i}."
        plan |= linear_pairs(NORMS, d, s)
        for ours, theirs in CONV1D.items():
            plan[f"{d}{ours}.weight"] = transpose(f"{s}{theirs}.weight")  # Conv1D stores [in, out]
            plan[f"{d}{ours}.bias"] = copy(f"{s}{theirs}.bias")
    drop = (
        "h.*.attn.bias",  # the causal mask and its fill value, buffers in older files
        "h.*.attn.masked_bias",
        "lm_head.weight",  # tied to wte (checked equal above when the LM head is kept)
    )
    return run_plan(sd, plan, drop, source="HF GPT-2 checkpoint")


def mmlm_to_hf_gpt2(sd: Mapping[str, torch.Tensor], cfg: TextConfig, heads: tuple[TextHead, ...] = ()) -> StateDict:
    """State dict of ``TextEncoder(cfg)`` (or ``TextWithHeads`` with ``heads=("clm",)``) -> what ``GPT2Model``
    (or ``GPT2LMHeadModel``, keys under ``transformer.``, ``lm_head`` tied and not written) saves."""
    config_to_hf(cfg)  # raises for what GPT-2 cannot express
    if set(heads) - {"clm"}:
        raise ConversionError(f"transformers' GPT-2 classes hold the clm head only, not {sorted(set(heads) - {'clm'})}")
    enc, dst = ("encoder.", "transformer.") if heads else ("", "")
    plan: Plan = {
        f"{dst}wte.weight": copy(f"{enc}token_embed.weight"),
        f"{dst}wpe.weight": copy(f"{enc}pos_embed"),
        **linear_pairs({"ln_f": "norm"}, dst, enc),
    }
    for i in range(cfg.depth):
        d, s = f"{dst}h.{i}.", f"{enc}blocks.{i}."
        plan |= linear_pairs({v: k for k, v in NORMS.items()}, d, s)
        for ours, theirs in CONV1D.items():
            plan[f"{d}{theirs}.weight"] = transpose(f"{s}{ours}.weight")  # nn.Linear [out, in] -> Conv1D [in, out]
            plan[f"{d}{theirs}.bias"] = copy(f"{s}{ours}.bias")
    return run_plan(sd, plan, source="mmlm GPT-2 state dict", target="HF GPT-2")
