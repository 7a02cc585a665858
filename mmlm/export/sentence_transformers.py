"""mmlm text encoder -> a folder that ``SentenceTransformer(folder)`` loads, laid out as ``SentenceTransformer.save``
writes it (and as all-MiniLM-L6-v2 ships):

===================================  ============================================================================
file                                 what it holds
===================================  ============================================================================
modules.json                         the pipeline: Transformer -> Pooling (-> Normalize)
config.json, model.safetensors       the Transformer module, at the root: a transformers ``BertModel`` folder
tokenizer.json, vocab.txt, ...       its tokenizer, ``model_max_length`` = the model's ``max_seq_length``
sentence_bert_config.json            ``max_seq_length``, ``do_lower_case``, BertModel without a pooler
1_Pooling/config.json                the pooling mode (``TextConfig.pool``)
2_Normalize/                         when the model L2-normalises (``TextConfig.normalize``)
config_sentence_transformers.json    versions, cosine similarity
===================================  ============================================================================

The old key layouts (``sentence_transformers.models.*`` types, a ``pooling_mode_*`` flag, ``model_args``) are
written on purpose: older sentence-transformers releases read them too. ``load_pretrained`` reads the folder back
into the same model, weights and config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmlm import __version__, checkpoint
from mmlm.convert import hf_bert
from mmlm.convert.common import ConversionError
from mmlm.models import TextEncoder, TextWithHeads

if TYPE_CHECKING:
    from mmlm.data.tokenizers import Tokenizer

POOLING = {  # TextConfig.pool -> its flag in 1_Pooling/config.json
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "last": "pooling_mode_lasttoken",
}


def export(model: nn.Module, folder: Path, *, tokenizer: Tokenizer | None = None, final: Path | None = None) -> Path:
    """Write ``model`` (a ``TextEncoder``, or the encoder of a ``TextWithHeads``) as a sentence-transformers folder."""
    import transformers

    encoder = model.encoder if isinstance(model, TextWithHeads) else model
    if not isinstance(encoder, TextEncoder):
        raise ConversionError(
            f"--to sentence_transformers exports text encoders (TextEncoder, TextWithHeads), "
            f"not a {type(model).__name__}"
        )
    cfg = encoder.cfg
    if cfg.pool not in POOLING:
        raise ConversionError(f"sentence-transformers pools by {', '.join(POOLING)} token(s), not by pool={cfg.pool!r}")
    # BertModel returns token states and leaves the pooling to 1_Pooling: any pool passes its checks
    bert = dataclasses.replace(cfg, pool="cls")
    hf = hf_bert.config_to_hf(bert)
    if tokenizer is None:
        raise ConversionError(
            "a sentence-transformers folder carries the model's tokenizer: give the one it was trained with "
            "(--tokenizer DIR, or tokenizer= in Python)"
        )
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConversionError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only {cfg.vocab_size}: "
            "give the tokenizer the model was trained with (--tokenizer)"
        )
    max_seq_length = cfg.max_seq_length or cfg.context_length

    transformers.BertConfig(**hf, architectures=["BertModel"]).save_pretrained(folder)
    weights = hf_bert.mmlm_to_hf_bert(encoder.state_dict(), bert)
    checkpoint.save_safetensors(  # as save_pretrained writes it: safetensors with format "pt"
        {k: v.detach().cpu().contiguous() for k, v in weights.items()}, folder / "model.safetensors", {"format": "pt"}
    )
    tokenizer.save(folder)
    _update_json(folder / "tokenizer_config.json", model_max_length=max_seq_length)
    _write_json(folder / "sentence_bert_config.json", {
        "max_seq_length": max_seq_length, "do_lower_case": cfg.do_lower_case,
        "model_args": {"add_pooling_layer": False},  # no BERT pooler in the model: none made up at load either
    })  # fmt: skip

    modules = {"Transformer": "", "Pooling": "1_Pooling"} | ({"Normalize": "2_Normalize"} if cfg.normalize else {})
    _write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": cfg.width, POOLING[cfg.pool]: True})
    if cfg.normalize:
        _write_json(folder / "2_Normalize" / "config.json", {})
    _write_json(folder / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (kind, path) in enumerate(modules.items())
    ])  # fmt: skip
    _write_json(folder / "config_sentence_transformers.json", {
        "__version__": {"mmlm": __version__, "transformers": transformers.__version__, "pytorch": torch.__version__},
        "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine",
    })  # fmt: skip
    return folder


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _update_json(path: Path, **fields: Any) -> None:
    _write_json(path, {**checkpoint.read_json(path), **fields})
