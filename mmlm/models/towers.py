"""Taking a tower out of a model, or putting one in, so that every model owns the weights it runs on.

A CLIP whose towers share blocks (``share != "none"``) holds one ``Transformer`` for both
modalities: each Block part is one module (shared) or a ``ModuleDict`` keyed by modality.
A tower taken out of it gets blocks of its own for its modality alone, where every part
is a plain module, so its state dict is the CLIP's renamed::

    CLIP                                  standalone image tower
    visual.patch_embed.proj.weight    ->  patch_embed.proj.weight
    blocks.0.attn.qkv.weight          ->  blocks.0.attn.qkv.weight            (shared part: copied)
    blocks.0.norm1.image.weight       ->  blocks.0.norm1.weight               (this modality's part)
    blocks.0.norm1.text.weight            dropped                             (the other modality's)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mmlm.config import TextWithHeadsConfig, update
from mmlm.errors import UsageTypeError
from mmlm.layers import MODALITIES
from mmlm.models.clip import CLIP
from mmlm.models.heads import TextWithHeads
from mmlm.models.text import TextEncoder
from mmlm.models.vision import VisionTransformer

Tower = VisionTransformer | TextEncoder


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")


def clip_tower(clip: CLIP, modality: str) -> Tower:
    """A standalone copy of ``clip``'s ``"image"`` or ``"text"`` tower (before the projection),
    owning every weight it runs on, shared blocks included."""
    _check_modality(modality)
    prefix, cfg, kind = ("visual.", clip.cfg.vision, VisionTransformer) if modality == "image" else \
        ("text.", clip.cfg.text, TextEncoder)  # fmt: skip
    state = {}
    for key, value in clip.state_dict().items():
        if key.startswith(prefix):
            state[key[len(prefix) :]] = value
        elif key.startswith("blocks."):  # the CLIP's shared stack: blocks.N.<part>[.<modality>].<rest>
            layer, part, *rest = key.split(".")[1:]
            if rest[0] in MODALITIES:
                if rest[0] != modality:
                    continue
                rest = rest[1:]
            state[".".join(["blocks", layer, part, *rest])] = value
    tower = kind(dataclasses.replace(cfg))
    tower.load_state_dict(state)  # strict: every weight the tower runs on comes from the CLIP
    return tower.to(clip.logit_scale.device).train(clip.training)


def tower(model: nn.Module, modality: str) -> Tower:
    """The ``modality`` tower of any mmlm model: a CLIP's as a standalone copy (``clip_tower``),
    a ``TextWithHeads``' encoder, or the model itself."""
    _check_modality(modality)
    if isinstance(model, CLIP):
        return clip_tower(model, modality)
    if isinstance(model, TextWithHeads):
        model = model.encoder
    kind = VisionTransformer if modality == "image" else TextEncoder
    if not isinstance(model, kind):
        raise UsageTypeError(f"a {type(model).__name__} has no {modality} tower (a {kind.__name__} or a CLIP has)")
    return model


def _carry_over(new: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load the tensors of ``state`` that ``new`` has in the same shape; the rest of ``new``
    (a head that is new or has another size) keeps its fresh initialisation."""
    own = new.state_dict()
    new.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


def vit_with_classes(model: nn.Module, num_classes: int) -> VisionTransformer:
    """The image tower of ``model`` with a ``num_classes`` head (0: none); a head of that size is kept."""
    encoder = tower(model, "image")
    new = VisionTransformer(update(encoder.cfg, num_classes=num_classes))
    _carry_over(new, encoder.state_dict())
    return new


def text_with_heads(model: nn.Module, heads: Sequence[str], **fields) -> TextWithHeads:
    """The text tower of ``model`` with ``heads`` (``fields``: other ``TextWithHeadsConfig`` fields);
    heads ``model`` already has in the same shape keep their weights, the others start fresh."""
    encoder = tower(model, "text")
    new = TextWithHeads(TextWithHeadsConfig(text=encoder.cfg, heads=tuple(heads), **fields))
    if isinstance(model, TextWithHeads):
        state = model.state_dict()
    else:
        state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    _carry_over(new, state)
    return new


def clip_with_tower(clip: CLIP, modality: str, new: Tower) -> CLIP:
    """``clip`` with its ``modality`` tower replaced by ``new`` (a head on an image tower is dropped).

    The result has two towers (``share="none"``), each owning its weights: once one tower is
    replaced nothing is shared any more. Projections and the temperature carry over where
    their shapes still fit.
    """
    _check_modality(modality)
    image = vit_with_classes(new, 0) if modality == "image" else clip_tower(clip, "image")
    text = new if modality == "text" else clip_tower(clip, "text")
    if text.cfg.normalize:  # a sentence encoder's unit vectors: the CLIP projects the raw pooled features
        text.cfg = dataclasses.replace(text.cfg, normalize=False)
    cfg = dataclasses.replace(clip.cfg, vision=image.cfg, text=text.cfg, share="none", share_layers=None)
    model = CLIP(cfg)
    model.visual, model.text = image, text
    kept = ("visual_projection.", "text_projection.", "logit_scale", "logit_bias")
    _carry_over(model, {k: v for k, v in clip.state_dict().items() if k.startswith(kept)})
    return model
