"""The one way from what a user names a model to the model: ``resolve(spec)``.

Tasks, the CLI commands and the CLIP_benchmark loader all call it, so every one of them accepts
the same specs (``SPEC_DOC``) and fails on a bad one with the same message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmlm.config import PRESETS, Activation, unknown_model
from mmlm.models.towers import tower
from mmlm.paths import resolve as resolve_path

# What every task's and command's ``model`` argument may be, worded once for their docstrings.
SPEC_DOC = "a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint ``mmlm.load_pretrained`` reads"


def resolve(
    spec: str | Path | nn.Module,
    *,
    part: Literal["image", "text"] | None = None,
    overrides: dict[str, Any] | None = None,
    with_heads: bool = True,
    act: Activation | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> nn.Module:
    """The model ``spec`` names, or its ``part`` tower.

    Args:
        spec: a preset name (random weights, in train mode as ``create_model`` builds them); an mmlm
            folder, a ``mmlm fit`` .ckpt or any checkpoint ``mmlm.load_pretrained`` reads (HF,
            OpenCLIP, timm, sentence-transformers; ``package:NAME/...``), loaded in eval mode;
            or an ``nn.Module``, returned as it is (or its ``part``), on its own device.
        part: ``None`` for the whole model, ``"image"`` or ``"text"`` for that tower alone, a
            standalone copy when taken out of a CLIP (``mmlm.models.tower``).
        overrides: config fields of a preset, as for ``create_model``; an error for anything else
            (a checkpoint's config is its own).
        with_heads: keep the heads a checkpoint carries; False loads its bare encoder
            (``load_pretrained``'s ``with_heads``). A preset's heads are config fields (``num_classes``).
        act: MLP activation of a checkpoint that does not record it (OpenAI / OpenCLIP state dicts).
        device: where the model lives.
        seed: seeds a preset's random weights (the global RNG is left as it was); None: not seeded.
    """
    is_module = isinstance(spec, nn.Module)
    is_preset = not is_module and str(spec) in PRESETS
    if not (is_module or is_preset or resolve_path(spec).exists()):
        raise ValueError(unknown_model(str(spec)))
    if overrides and not is_preset:
        raise ValueError("model_overrides apply to presets only, not to a checkpoint")
    if is_module:
        model = spec
    elif is_preset:
        model = _create(str(spec), overrides or {}, seed).to(device)
    else:
        from mmlm.pretrained import load_pretrained  # lazily: pretrained imports mmlm.models

        model = load_pretrained(spec, act=act, with_heads=with_heads, device=device)
    return model if part is None else tower(model, part)


def _create(name: str, overrides: dict[str, Any], seed: int | None) -> nn.Module:
    """A preset with random weights; seeded ones from a forked RNG, so that seeding one model
    leaves the caller's random stream as it was (weights are drawn on the CPU)."""
    from mmlm.models import create_model  # defined in the package's __init__, which imports this module

    if seed is None:
        return create_model(name, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **overrides)
