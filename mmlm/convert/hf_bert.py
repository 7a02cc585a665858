"""Hugging Face BERT (``BertModel``, ``BertForMaskedLM``, ``BertForPreTraining``) -> mmlm.

BERT is post-LN: ``attention.output.LayerNorm`` follows the attention residual (mmlm's
``norm1``) and ``output.LayerNorm`` the MLP residual (``norm2``); there is no final
norm, but a LayerNorm right after the embeddings. The heads map onto
``mmlm.models.heads``: ``cls.predictions`` (MLM, decoder tied to the word embeddings),
``bert.pooler`` and ``cls.seq_relationship`` (NSP).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from mmlm.config import TextConfig, TextHead
from mmlm.convert.common import (
    ConversionError,
    Plan,
    StateDict,
    act_from_hf,
    cat,
    check_tied,
    copy,
    linear_pairs,
    mlp_ratio,
    run_plan,
    strip_prefix,
)

LAYER = {
    "norm1": "attention.output.LayerNorm",
    "attn.proj": "attention.output.dense",
    "norm2": "output.LayerNorm",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
HEADS = {
    "pooler": {"pooler.dense": "pooler.dense"},
    "mlm": {"mlm.dense": "cls.predictions.transform.dense", "mlm.norm": "cls.predictions.transform.LayerNorm"},
    "nsp": {"nsp.fc": "cls.seq_relationship"},
}
# BERT's special tokens in the standard uncased/cased WordPiece vocabularies (30522 / 28996 ids)
STANDARD_SPECIAL_IDS = {"[PAD]": 0, "[SEP]": 102, "[MASK]": 103}


def canonical(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop the ``bert.`` prefix of the task models and rename TF-era ``LayerNorm.gamma/beta``."""
    out: StateDict = {}
    for k, v in strip_prefix(sd, "bert.").items():
        if "LayerNorm." in k:  # checkpoints converted from TensorFlow name LayerNorm weights gamma/beta
            k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def heads_in(sd: Mapping[str, torch.Tensor]) -> tuple[TextHead, ...]:
    """Which heads a (canonical) BERT state dict carries, in mmlm's names."""
    present = {"pooler": "pooler.dense.weight", "mlm": "cls.predictions.bias", "nsp": "cls.seq_relationship.weight"}
    return tuple(h for h, key in present.items() if key in sd)  # type: ignore[misc]


def config_from_hf(
    hf: Mapping[str, Any],
    special_ids: Mapping[str, int] | None = None,
    pool: Literal["cls", "mean"] = "cls",
) -> TextConfig:
    """mmlm ``TextConfig`` for a HF ``BertConfig`` dict; ``special_ids`` maps ``[SEP]``/``[MASK]``/``[PAD]`` to ids."""
    import transformers

    c = transformers.BertConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ConversionError(
            f"position_embedding_type {c.position_embedding_type!r}: mmlm has absolute positions only"
        )
    if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
        raise ConversionError("a decoder BERT (is_decoder / cross-attention) has no mmlm equivalent")
    ids = dict(special_ids) if special_ids else (STANDARD_SPECIAL_IDS if c.vocab_size in (30522, 28996) else {})
    return TextConfig(
        width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
        mlp_ratio=mlp_ratio(c.hidden_size, c.intermediate_size), act=act_from_hf(c.hidden_act),
        norm_eps=c.layer_norm_eps, pre_norm=False, qkv_bias=True,
        dropout=c.hidden_dropout_prob, attn_dropout=c.attention_probs_dropout_prob,
        vocab_size=c.vocab_size, context_length=c.max_position_embeddings, causal=False,
        type_vocab_size=c.type_vocab_size, embed_norm=True, final_norm=False, pool=pool,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else ids.get("[PAD]", 0),
        eot_token_id=ids.get("[SEP]"), mask_token_id=ids.get("[MASK]"), init="bert",
    )  # fmt: skip


def hf_bert_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: TextConfig, heads: tuple[TextHead, ...] = ()) -> StateDict:
    """BERT state dict -> state dict of ``TextEncoder(cfg)``, or of ``TextWithHeads`` when ``heads`` is given.

    Head weights present in the checkpoint but not asked for are dropped on purpose
    (e.g. the pooler when only sentence embeddings are wanted); asked-for heads must be there.
    """
    sd = canonical(sd)
    if "mlm" in heads:
        check_tied(sd, "cls.predictions.decoder.weight", "embeddings.word_embeddings.weight")
        check_tied(sd, "cls.predictions.decoder.bias", "cls.predictions.bias")
    enc = "encoder." if heads else ""
    plan: Plan = {
        f"{enc}token_embed.weight": copy("embeddings.word_embeddings.weight"),
        f"{enc}pos_embed": copy("embeddings.position_embeddings.weight"),
        **linear_pairs({"norm_embed": "embeddings.LayerNorm"}, enc, ""),
    }
    if cfg.type_vocab_size:
        plan[f"{enc}type_embed.weight"] = copy("embeddings.token_type_embeddings.weight")
    for i in range(cfg.depth):
        d, s = f"{enc}blocks.{i}.", f"encoder.layer.{i}."
        plan |= linear_pairs(LAYER, d, s)
        for p in ("weight", "bias"):
            plan[f"{d}attn.qkv.{p}"] = cat(*(f"{s}attention.self.{x}.{p}" for x in ("query", "key", "value")))
    drop = [
        "embeddings.position_ids",  # a buffer in older files
        "cls.predictions.decoder.*",  # tied copies (checked equal above when the MLM head is kept)
    ]
    for head, table in HEADS.items():
        if head in heads:
            plan |= linear_pairs(table, "", "")
        else:
            drop += [f"{theirs}.*" for theirs in table.values()]
    if "mlm" in heads:
        plan["mlm.bias"] = copy("cls.predictions.bias")
    else:
        drop.append("cls.predictions.bias")
    return run_plan(sd, plan, drop, source="HF BERT checkpoint")
