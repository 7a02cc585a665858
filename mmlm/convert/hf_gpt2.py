"""Hugging Face GPT-2 (``GPT2Model``, ``GPT2LMHeadModel``) -> mmlm.

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


def config_from_hf(hf: Mapping[str, Any]) -> TextConfig:
    """mmlm ``TextConfig`` for a HF ``GPT2Config`` dict."""
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
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else eot, eot_token_id=eot, init="gpt2",
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
