"""mmlm models: the two towers and CLIP, all built from ``mmlm.layers.Block``."""

from __future__ import annotations

from typing import Any

from torch import nn

from mmlm.config import CLIPConfig, ModelConfig, TextConfig, TextWithHeadsConfig, VisionConfig, from_name, update
from mmlm.models.clip import CLIP
from mmlm.models.heads import TextWithHeads
from mmlm.models.text import TextEncoder
from mmlm.models.vision import VisionTransformer

MODEL_TYPES: dict[type, type[nn.Module]] = {
    CLIPConfig: CLIP,
    TextConfig: TextEncoder,
    VisionConfig: VisionTransformer,
    TextWithHeadsConfig: TextWithHeads,
}


def create_model(name_or_config: str | ModelConfig, **overrides: Any) -> nn.Module:
    """Build a randomly initialised model from a preset name or a config.

    >>> create_model("clip-vit-b-32", share="attention", text={"width": 768, "heads": 12})
    """
    if isinstance(name_or_config, str):
        cfg = from_name(name_or_config, **overrides)
    else:
        cfg = update(name_or_config, **overrides) if overrides else name_or_config
    return MODEL_TYPES[type(cfg)](cfg)


__all__ = ["CLIP", "TextEncoder", "TextWithHeads", "VisionTransformer", "create_model"]
