"""Write an mmlm model in another ecosystem's own format, for that ecosystem's own loading code.

=========================  ========================================  ====================================
``to``                     what is written                           loaded by
=========================  ========================================  ====================================
``mmlm``                   config.json + model.safetensors           ``mmlm.load``
``hf``                     a transformers folder: weights, config,   ``CLIPModel`` / ``BertFor...`` /
                           tokenizer, preprocessor_config.json       ``GPT2LMHeadModel`` / ``ViTFor...``,
                                                                     ``pipeline(...)``
``open_clip``              open_clip_config.json +                   ``open_clip.create_model_and_transforms
                           open_clip_model.safetensors               ("local-dir:DIR")``
``timm``                   model.safetensors + config.json with      ``timm.create_model(name, pretrained=True,
                           the pretrained config                     pretrained_cfg_overlay=dict(file=...))``
``sentence_transformers``  modules.json, the transformer folder,     ``SentenceTransformer(DIR)``
                           Pooling (and Normalize)
``onnx``                   image.onnx + text.onnx (normalised         ``onnxruntime.InferenceSession`` in any
                           embeddings), tokenizer.json,               language; ``mmlm.serve.runtime.onnx.
                           preprocess.json, onnx.json                 OnnxEncoder`` (no torch)
=========================  ========================================  ====================================

Each target lives in a module of its own with one function
``export(model, folder, *, tokenizer=None, final, **options) -> Path`` writing into ``folder``, which is
renamed to ``final`` once complete; ``export`` here claims the folder (``mmlm.outputs``) and dispatches
(``options``: a target's own, such as onnx's ``int8``). A model the target cannot express raises
``ConversionError`` saying what does not fit, and nothing is left behind.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torch import nn

from mmlm import checkpoint, outputs

if TYPE_CHECKING:
    from mmlm.data.tokenizers import Tokenizer

Target = Literal["mmlm", "hf", "open_clip", "timm", "sentence_transformers", "onnx"]
TARGETS: dict[str, str] = {  # target -> module under mmlm.export
    "hf": "hf",
    "open_clip": "open_clip",
    "timm": "timm",
    "sentence_transformers": "sentence_transformers",
    "onnx": "onnx",
}


def export(
    model: nn.Module,
    folder: str | Path,
    to: Target = "mmlm",
    *,
    tokenizer: Tokenizer | None = None,
    overwrite: bool = False,
    **options: object,
) -> Path:
    """Write ``model`` into ``folder`` for target ``to``; returns the folder.

    ``folder`` must be new or empty; ``overwrite=True`` replaces a folder mmlm exported for the same
    target, nothing else (``mmlm.outputs``). The folder appears, complete, at the end.

    ``tokenizer``: the tokenizer the model was trained with, written beside the weights where the
    target keeps one (hf, open_clip, sentence_transformers); None for the CLIP BPE when the
    vocabulary is CLIP's 49,408 tokens.

    ``options``: the target's own keywords (``onnx``: ``int8``, ``source``; ``mmlm.export.onnx.export``).
    """
    if options and to != "onnx":
        raise ValueError(f"{', '.join(options)}: options of --to onnx, not of --to {to}")
    if to == "mmlm":
        return checkpoint.save(model, folder, overwrite=overwrite)
    if to not in TARGETS:
        raise ValueError(f"to must be one of {['mmlm', *TARGETS]}, not {to!r}")
    module = importlib.import_module(f"mmlm.export.{TARGETS[to]}")
    folder = Path(folder)
    with outputs.writing(folder, to, overwrite) as staging:
        module.export(model.eval(), staging, tokenizer=tokenizer, final=folder, **options)
    return folder


__all__ = ["TARGETS", "Target", "export"]
