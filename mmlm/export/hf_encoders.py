"""mmlm BERT / GPT-2 text models (with their heads) and ViTs -> transformers folders.

The family follows from the config, the class from the heads:

======================================================  ==============================================
mmlm model                                              transformers class
======================================================  ==============================================
TextEncoder, bidirectional post-LN with token types     ``BertModel`` (``pooler``: with its pooler)
  + heads ``mlm``, ``pooler``, ``nsp``                  ``BertForPreTraining``
  + head ``mlm``                                        ``BertForMaskedLM``
  + heads ``pooler``, ``nsp``                           ``BertForNextSentencePrediction``
  + heads ``pooler``, ``classifier``                    ``BertForSequenceClassification``
  + head ``token_classifier`` / ``qa``                  ``BertForTokenClassification`` / ``...QuestionAnswering``
TextEncoder, causal pre-LN, learned positions           ``GPT2Model``
  + head ``clm``                                        ``GPT2LMHeadModel`` (tied to ``wte``)
VisionTransformer, class token, pre-LN                  ``ViTModel``
  with ``num_classes``                                  ``ViTForImageClassification``
======================================================  ==============================================

Before anything is written, the transformers config is read back through the same
``config_from_hf`` that loads it, and every field that would come back different is
refused: the folder always loads into the model that was exported. Only what does not
change the outputs may be lost: stochastic depth, patch dropout, the init scheme, and a
BERT's ``pool`` (``BertModel`` returns token states). ``BertModel`` / ``ViTModel`` without a
pooler in the model get transformers' own randomly initialised one (it says so when loading);
``last_hidden_state`` is the model's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmlm import checkpoint
from mmlm.config import TextConfig, TextHead, VisionConfig
from mmlm.convert import hf_bert, hf_gpt2, hf_vit
from mmlm.convert.common import ConversionError, StateDict
from mmlm.models import TextEncoder, TextWithHeads, VisionTransformer

if TYPE_CHECKING:
    from mmlm.data.tokenizers import Tokenizer

BERT_CLASSES: dict[tuple[str, ...], str] = {  # sorted heads -> class
    (): "BertModel",
    ("pooler",): "BertModel",
    ("mlm", "nsp", "pooler"): "BertForPreTraining",
    ("mlm",): "BertForMaskedLM",
    ("nsp", "pooler"): "BertForNextSentencePrediction",
    ("classifier", "pooler"): "BertForSequenceClassification",
    ("token_classifier",): "BertForTokenClassification",
    ("qa",): "BertForQuestionAnswering",
}
GPT2_CLASSES: dict[tuple[str, ...], str] = {(): "GPT2Model", ("clm",): "GPT2LMHeadModel"}
# fields that only act in training, or that transformers leaves to the user: allowed to come back as the default
MAY_BE_LOST = ("drop_path", "patch_dropout", "init", "pool")
CLIP_VOCAB = 49408


def export(model: nn.Module, folder: Path, *, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (and a text model's ``tokenizer``) into the empty ``folder`` as transformers' class for it."""
    if isinstance(model, VisionTransformer):
        if tokenizer is not None:
            raise ConversionError("a ViT takes images: it is exported without a tokenizer")
        return _vit(model, folder)
    if isinstance(model, (TextEncoder, TextWithHeads)):
        return _text(model, folder, tokenizer)
    raise ConversionError(
        f"--to hf exports CLIP, BERT, GPT-2 and ViT models (with their heads), not a {type(model).__name__}"
    )


def _text(model: TextEncoder | TextWithHeads, folder: Path, tokenizer: Tokenizer | None) -> Path:
    import transformers

    encoder = model.encoder if isinstance(model, TextWithHeads) else model
    cfg: TextConfig = encoder.cfg
    heads: tuple[TextHead, ...] = model.cfg.heads if isinstance(model, TextWithHeads) else ()
    family, module, classes = ("GPT-2", hf_gpt2, GPT2_CLASSES) if cfg.causal else ("BERT", hf_bert, BERT_CLASSES)
    hf = module.config_to_hf(cfg)
    _check_inverse(cfg, module.config_from_hf(hf), family)
    arch = classes.get(tuple(sorted(heads)))
    if arch is None:
        raise ConversionError(_no_class(family, heads, classes))
    if {"classifier", "token_classifier"} & set(heads):
        hf |= {"num_labels": model.cfg.num_labels, "classifier_dropout": model.cfg.classifier_dropout}
    to_hf = hf_gpt2.mmlm_to_hf_gpt2 if cfg.causal else hf_bert.mmlm_to_hf_bert
    weights = to_hf(model.state_dict() if heads else encoder.state_dict(), cfg, heads)
    if tokenizer is None and cfg.vocab_size == CLIP_VOCAB:
        from mmlm.data.tokenizers import clip_tokenizer

        tokenizer = clip_tokenizer(cfg.context_length)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ConversionError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only {cfg.vocab_size}: "
            "give the tokenizer the model was trained with (--tokenizer)"
        )
    config_class = transformers.GPT2Config if cfg.causal else transformers.BertConfig
    hf_config = config_class(**hf, architectures=[arch])
    _write(hf_config, weights, folder)
    if arch == "GPT2LMHeadModel":
        transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def _vit(model: VisionTransformer, folder: Path) -> Path:
    import transformers

    cfg = model.cfg
    hf = hf_vit.config_to_hf(cfg)
    pre = hf_vit.preprocessor_to_hf(cfg)
    _check_inverse(cfg, hf_vit.config_from_hf(hf, pre, cfg.num_classes), "ViT")
    weights = hf_vit.mmlm_to_hf_vit(model.state_dict(), cfg)
    arch = "ViTForImageClassification" if cfg.num_classes else "ViTModel"
    labels = {"num_labels": cfg.num_classes} if cfg.num_classes else {}
    _write(transformers.ViTConfig(**hf, **labels, architectures=[arch]), weights, folder)
    transformers.ViTImageProcessor(**pre).save_pretrained(folder)
    return folder


def _check_inverse(cfg: TextConfig | VisionConfig, back: TextConfig | VisionConfig, family: str) -> None:
    """Refuse a model whose transformers config would load back as another model."""
    ours, theirs = dataclasses.asdict(cfg), dataclasses.asdict(back)
    if cfg.mlp_dim == back.mlp_dim:  # the same MLP, whatever float ratio gave it
        theirs["mlp_ratio"] = ours["mlp_ratio"]
    diff = [
        f"{k}={v!r} (would load back as {theirs[k]!r})"
        for k, v in ours.items()
        if v != theirs[k] and k not in MAY_BE_LOST
    ]
    if diff:
        raise ConversionError(f"transformers' {family} config cannot express: " + ", ".join(diff))


def _no_class(family: str, heads: tuple[str, ...], classes: dict[tuple[str, ...], str]) -> str:
    if heads == ("classifier",) and family == "BERT":
        return (
            "this classifier reads the encoder's pooled state without BERT's pooler, while transformers' "
            "BertForSequenceClassification classifies the pooler output (dense + tanh on [CLS]): fine-tune with "
            "the heads ['pooler', 'classifier'] (TextClassification does for a BERT) to export it"
        )
    known = "; ".join(f"{' + '.join(k) or 'no heads'} -> {v}" for k, v in classes.items())
    return f"no transformers {family} class holds the heads {list(heads)} (it has: {known})"


def _write(hf_config: Any, weights: StateDict, folder: Path) -> None:
    """config.json and model.safetensors as ``save_pretrained`` writes them (safetensors with format "pt")."""
    hf_config.save_pretrained(folder)
    checkpoint.save_safetensors(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
