"""mmlm models: the two towers, CLIP and CoCa, all built from ``mmlm.layers.Block``.

What each model returns (head outputs named as transformers names them):

=========================  =====================================================================
model                      ``forward`` returns
=========================  =====================================================================
``VisionTransformer``      (B, width) pooled features; (B, num_classes) logits with ``num_classes``
``TextEncoder``            (B, width) pooled features (``forward_features``: (B, T, width))
``CLIP``                   ``CLIPOutput``: ``image_embeds`` / ``text_embeds`` (B, embed_dim),
                           L2-normalised (None for a side not given), ``logit_scale``,
                           ``logit_bias``; ``logits_per_image`` (B_img, B_txt) on access
``CoCa``                   ``CoCaOutput``: ``CLIPOutput`` plus ``logits`` (B, T - 1, vocab), the
                           decoder's next-token logits, and ``labels`` (B, T - 1) = ids[:, 1:]
                           (-100 at padding); both None unless images and text are given.
                           ``generate(images)`` -> (B, L) caption ids
``TextWithHeads``          dict: ``hidden_states`` (B, T, width) and, per head, ``pooled``,
                           ``mlm_logits``, ``nsp_logits``, ``clm_logits``, ``logits`` (classifier
                           (B, labels) or token_classifier (B, T, labels)), ``start_logits`` /
                           ``end_logits`` (qa, (B, T) each)
=========================  =====================================================================

``mmlm.factory`` is the one way from a preset name or a checkpoint to a model (or one tower of it).

``tower(model, "image" | "text")`` takes a tower out of any of them; one taken out of a
CLIP (``clip_tower``) is a standalone copy that owns every weight it runs on.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmlm.config import (
    CLIPConfig,
    CoCaConfig,
    ModelConfig,
    TextConfig,
    TextWithHeadsConfig,
    VisionConfig,
    from_name,
    update,
)
from mmlm.models.clip import CLIP
from mmlm.models.coca import CoCa, CoCaOutput
from mmlm.models.heads import TextWithHeads
from mmlm.models.text import TextEncoder
from mmlm.models.towers import clip_tower, clip_with_tower, text_with_heads, tower, vit_with_classes
from mmlm.models.vision import VisionTransformer

MODEL_TYPES: dict[type, type[nn.Module]] = {
    CLIPConfig: CLIP,
    CoCaConfig: CoCa,
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


__all__ = [
    "CLIP",
    "CoCa",
    "CoCaOutput",
    "TextEncoder",
    "TextWithHeads",
    "VisionTransformer",
    "clip_tower",
    "clip_with_tower",
    "create_model",
    "text_with_heads",
    "tower",
    "vit_with_classes",
]
