"""The model an evaluation runs on and the result it writes, in CLIP_benchmark's JSON layout.

``mmlm zeroshot`` and ``mmlm eval-retrieval`` take a model (``load_model``, ``model_tokenizer``),
a dataset (``mmlm.data.eval_datasets``) and write one result (``benchmark_result``, ``write_result``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlm.data.skips import SkippingDataLoader
from mmlm.data.tokenizers import CLIP_VOCAB_SIZE, Tokenizer, get_tokenizer
from mmlm.paths import resolve


def load_model(
    spec: str | Path, act: str | None = None, device: str | torch.device = "cpu", seed: int = 0, int8: bool = False,
    use: str = "zero-shot evaluation",
) -> nn.Module:  # fmt: skip
    """The image-text model ``spec`` names (``mmlm.models.resolve``; a preset's random weights seeded by
    ``seed``, for smoke tests) in eval mode, refused unless it encodes both images and text.
    ``int8``: quantized on the fly for the CPU (``mmlm.compress.quantize_int8``). ``use``: what needs the
    model, for the refusal (``mmlm index build``)."""
    from mmlm.errors import UsageError, check_device
    from mmlm.models import resolve as resolve_model

    check_device(str(device))
    model = resolve_model(spec, act=act, device=device, seed=seed).eval()
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise UsageError(f"{spec} is a {type(model).__name__}: {use} needs an image-text (CLIP) model")
    if int8:
        from mmlm.compress import quantize_int8

        model = quantize_int8(model)
    return model


def model_tokenizer(model: nn.Module, tokenizer: str | Path | None = None, checkpoint: str | Path | None = None) -> Tokenizer:
    """The tokenizer for ``model``: ``tokenizer`` if given, else one saved in the ``checkpoint`` folder
    (``tokenizer.json``), else the CLIP BPE for a 49,408-token vocabulary. Truncates where the text tower
    does (``max_seq_length``, e.g. a sentence-transformers tower's 256, else its context length)."""
    context = model.cfg.text.max_seq_length or model.cfg.text.context_length
    if tokenizer is not None:
        return get_tokenizer(tokenizer, context_length=context)
    if checkpoint is not None and (resolve(checkpoint) / "tokenizer.json").is_file():
        return get_tokenizer(resolve(checkpoint), context_length=context)
    if model.cfg.text.vocab_size == CLIP_VOCAB_SIZE:
        return get_tokenizer("clip", context_length=context)
    raise ValueError(
        f"the text tower has {model.cfg.text.vocab_size} tokens, not CLIP's {CLIP_VOCAB_SIZE}: give its tokenizer folder"
    )


def describe_model(spec: str | Path, seed: int = 0) -> tuple[str, str]:
    """The ``model`` and ``pretrained`` fields of a result: the argument as given, and the weights' source."""
    path = resolve(spec)
    return str(spec), str(path.resolve()) if path.exists() else f"random-init-seed{seed}"


def benchmark_result(
    dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, float | None], language: str = "en",
    samples: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One run's result, in the JSON layout CLIP_benchmark writes (and its ``build_csv`` reads),
    plus ``samples``: what the metrics were computed on (see ``sample_counts``)."""
    result = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
              "language": language}  # fmt: skip
    return result if samples is None else {**result, "samples": samples}


def sample_counts(loader: SkippingDataLoader) -> dict[str, Any]:
    """``{"used": N, "skipped": {reason: count}}`` of the loader's last full pass.

    A result computed on 1 image out of 3 must say so in the result, not only in a log line.
    """
    return {"used": loader.stats.good, "skipped": loader.stats.history[-1] if loader.stats.history else {}}


def write_result(result: dict[str, Any], path: str | Path | None = None, overwrite: bool = False) -> str:
    """Print the result as JSON and write it to ``path`` if given (an existing file only if ``overwrite``).

    Strict JSON: a metric that does not exist (acc5 with fewer than 5 classes) is ``null``, never
    ``NaN``, which JSON readers other than Python's refuse.
    """
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text)
    if path is not None:
        from mmlm import outputs

        outputs.write_file(path, text + "\n", overwrite)
    return text
