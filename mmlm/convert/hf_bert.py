"""Hugging Face BERT (``BertModel``, ``BertForPreTraining`` and the task classes) <-> mmlm.

BERT is post-LN: ``attention.output.LayerNorm`` follows the attention residual (mmlm's
``norm1``) and ``output.LayerNorm`` the MLP residual (``norm2``); there is no final
norm, but a LayerNorm right after the embeddings. The heads map onto
``mmlm.models.heads``: ``cls.predictions`` (MLM, decoder tied to the word embeddings),
``bert.pooler``, ``cls.seq_relationship`` (NSP), ``classifier`` of ``BertForSequenceClassification``
(on the pooler output, mmlm's ``pooler`` + ``classifier``) and of ``BertForTokenClassification``
(``token_classifier``), ``qa_outputs`` of ``BertForQuestionAnswering``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    chunk,
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
    "classifier": {"classifier": "classifier"},
    "token_classifier": {"token_classifier": "classifier"},
    "qa": {"qa": "qa_outputs"},
}
# the heads a checkpoint's keys give away; BertForSequenceClassification and BertForTokenClassification
# both name theirs ``classifier``: config.json's ``architectures`` tells which (``heads_in``)
FOUND_BY = {
    "pooler": "pooler.dense.weight", "mlm": "cls.predictions.bias", "nsp": "cls.seq_relationship.weight",
    "qa": "qa_outputs.weight",
}  # fmt: skip
CLASSIFIER_OF = {"BertForSequenceClassification": "classifier", "BertForTokenClassification": "token_classifier"}
HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}  # the same ops as mmlm's
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


def heads_in(sd: Mapping[str, torch.Tensor], architectures: Sequence[str] = ()) -> tuple[TextHead, ...]:
    """Which heads a (canonical) BERT state dict carries, in mmlm's names; ``architectures`` (config.json's)
    tells whose ``classifier`` it holds, which is left unread without it."""
    found = [h for h, key in FOUND_BY.items() if key in sd]
    owner = next((CLASSIFIER_OF[a] for a in architectures if a in CLASSIFIER_OF), None)
    if owner and "classifier.weight" in sd:
        found.append(owner)
    return tuple(found)  # type: ignore[return-value]


def labels_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``num_labels`` and ``classifier_dropout`` of a classifier head for a HF ``BertConfig`` dict
    (config.json keeps the labels as ``id2label``; no ``classifier_dropout`` means the hidden dropout)."""
    import transformers

    c = transformers.BertConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    dropout = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
    return {"num_labels": c.num_labels, "classifier_dropout": dropout}


def config_from_hf(
    hf: Mapping[str, Any],
    special_ids: Mapping[str, int] | None = None,
    pool: Literal["cls", "mean"] = "cls",
) -> TextConfig:
    """mmlm ``TextConfig`` for a HF ``BertConfig`` dict; ``special_ids`` maps ``[SEP]``/``[MASK]``/``[PAD]`` to ids.

    ``sep_token_id`` / ``mask_token_id`` in the config (written by ``config_to_hf``) win over the vocabulary.
    """
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
        eot_token_id=hf["sep_token_id"] if "sep_token_id" in hf else ids.get("[SEP]"),
        mask_token_id=hf["mask_token_id"] if "mask_token_id" in hf else ids.get("[MASK]"), init="bert",
    )  # fmt: skip


def config_to_hf(cfg: TextConfig) -> dict[str, Any]:
    """``BertConfig`` arguments for ``cfg``, the inverse of ``config_from_hf``; refuses what BERT cannot express.

    ``pool`` is not written: ``BertModel`` returns token states and leaves pooling to its user.
    """
    misfits = [why for bad, why in (
        (cfg.causal, "causal attention (a causal model exports as GPT-2)"),
        (cfg.pre_norm, "pre-LN blocks (BERT is post-LN)"),
        (not cfg.embed_norm, "no LayerNorm after the embeddings"),
        (cfg.final_norm, "a LayerNorm after the last block"),
        (cfg.pos_embed != "learned", f"{cfg.pos_embed} positions"),
        (cfg.type_vocab_size < 1, "no token-type embeddings (BERT always adds them)"),
        (not cfg.qkv_bias, "no qkv bias"),
        (cfg.layer_scale is not None, "LayerScale"),
        (cfg.pool not in ("cls", "mean"), f"pool={cfg.pool!r}"),
    ) if bad]  # fmt: skip
    if misfits:
        raise ConversionError("transformers' BERT cannot express this text model: " + "; ".join(misfits))
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim, "hidden_act": HF_ACT[cfg.act],
        "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
        "max_position_embeddings": cfg.context_length, "type_vocab_size": cfg.type_vocab_size,
        "pad_token_id": cfg.pad_token_id, "sep_token_id": cfg.eot_token_id, "mask_token_id": cfg.mask_token_id,
    }  # fmt: skip


def hf_bert_to_mmlm(sd: Mapping[str, torch.Tensor], cfg: TextConfig, heads: tuple[TextHead, ...] = ()) -> StateDict:
    """BERT state dict -> state dict of ``TextEncoder(cfg)``, or of ``TextWithHeads`` when ``heads`` is given.

    Head weights present in the checkpoint but not asked for are dropped on purpose
    (e.g. the pooler when only sentence embeddings are wanted); asked-for heads must be there.
    A ``classifier`` (whose, the keys do not say) is dropped only for a bare encoder.
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
        elif head in FOUND_BY or not heads:
            drop += [f"{theirs}.*" for theirs in table.values()]
    if "mlm" in heads:
        plan["mlm.bias"] = copy("cls.predictions.bias")
    else:
        drop.append("cls.predictions.bias")
    return run_plan(sd, plan, drop, source="HF BERT checkpoint")


def mmlm_to_hf_bert(sd: Mapping[str, torch.Tensor], cfg: TextConfig, heads: tuple[TextHead, ...] = ()) -> StateDict:
    """State dict of ``TextEncoder(cfg)`` (or ``TextWithHeads`` with ``heads``) -> what transformers' BERT class
    for those heads saves (the inverse of ``hf_bert_to_mmlm``).

    ``BertModel`` (no heads, or the pooler alone) keeps its keys bare, the task classes put them under
    ``bert.``; the tied MLM decoder is not written, as ``save_pretrained`` leaves it out too.
    """
    config_to_hf(cfg)  # raises for what BERT cannot express
    enc = "encoder." if heads else ""
    plan: Plan = {
        "embeddings.word_embeddings.weight": copy(f"{enc}token_embed.weight"),
        "embeddings.position_embeddings.weight": copy(f"{enc}pos_embed"),
        "embeddings.token_type_embeddings.weight": copy(f"{enc}type_embed.weight"),
        **linear_pairs({"embeddings.LayerNorm": "norm_embed"}, "", enc),
    }
    for i in range(cfg.depth):
        d, s = f"encoder.layer.{i}.", f"{enc}blocks.{i}."
        plan |= linear_pairs({v: k for k, v in LAYER.items()}, d, s)
        for p in ("weight", "bias"):
            for j, x in enumerate(("query", "key", "value")):
                plan[f"{d}attention.self.{x}.{p}"] = chunk(f"{s}attn.qkv.{p}", j)
    for head in heads:
        if head not in HEADS:
            raise ConversionError(f"transformers' BERT classes have no {head!r} head")
        plan |= linear_pairs({v: k for k, v in HEADS[head].items()}, "", "")
    if "mlm" in heads:
        plan["cls.predictions.bias"] = copy("mlm.bias")
    bert = "bert." if set(heads) - {"pooler"} else ""
    plan = {(bert + k if k.startswith(("embeddings.", "encoder.", "pooler.")) else k): op for k, op in plan.items()}
    return run_plan(sd, plan, source="mmlm BERT state dict", target="HF BERT")
