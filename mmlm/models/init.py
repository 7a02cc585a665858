"""How a new model starts: each family as its reference initialises it, chosen by ``TransformerConfig.init``.

- ``bert``: transformers' ``BertPreTrainedModel._init_weights``: every Linear, conv and
  embedding N(0, 0.02), zero biases, the padding row of the vocabulary 0.
- ``gpt2``: transformers' ``GPT2PreTrainedModel._init_weights``: as bert without the padding
  row, and the residual projections (``attn.proj``, ``mlp.fc2``) N(0, 0.02 / sqrt(2 depth)).
- ``timm``: timm's ``VisionTransformer.init_weights`` (``init_weights_vit_timm``): Linear
  trunc-N(0, 0.02), zero biases, ``pos_embed`` trunc-N(0, 0.02), ``cls_token`` N(0, 1e-6).
- ``clip``: OpenCLIP. Text tower (``TextTransformer.init_parameters``): token N(0, 0.02),
  positions N(0, 0.01), qkv N(0, w^-1/2), attn.proj and fc2 N(0, w^-1/2 (2 depth)^-1/2), fc1
  N(0, (2w)^-1/2). Image tower (``VisionTransformer``, which writes no init of its own):
  class token and positions N(0, w^-1/2), attention as ``nn.MultiheadAttention`` starts
  (xavier-uniform qkv, zero biases), everything else PyTorch's default. Projections N(0, w^-1/2).

In every family LayerNorms start at 1 / 0 and LayerScale at its init value; what a
reference leaves alone (timm's and OpenCLIP's patch conv, OpenCLIP's MLP biases) keeps
PyTorch's default, reset here so that the result never depends on what ran before.

Each model calls ``init_weights`` once at the end of ``__init__`` on what it owns: a tower
on itself (its blocks only when it built them), ``TextWithHeads`` on its heads, and a CLIP
on its projections and the blocks its towers share (``init_clip``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from timm.layers import LayerScale, Mlp, trunc_normal_
from torch import nn

from mmlm.config import TransformerConfig
from mmlm.layers import MODALITIES, Attention

if TYPE_CHECKING:
    from mmlm.models.clip import CLIP

HF_STD = 0.02  # initializer_range of BertConfig and GPT2Config
DEFAULT_INIT = (nn.Conv2d, nn.LayerNorm, LayerScale)  # PyTorch's / timm's own reset_parameters


def init_weights(module: nn.Module, cfg: TransformerConfig, modality: str) -> None:
    """Initialise every parameter ``module`` holds as the reference of ``cfg.init`` does.

    ``module`` is a tower, a head, or a stack of blocks; ``modality`` (``"text"`` or
    ``"image"``) is what it serves, which only OpenCLIP's rule tells apart.
    """
    FAMILIES[cfg.init](module, cfg, modality)


def init_clip(model: CLIP) -> None:
    """What a CLIP owns beside its towers: the two projections and, with ``share != "none"``, the shared blocks.

    OpenCLIP draws both projections from N(0, width^-1/2). Shared blocks follow OpenCLIP's
    rule part by part: a part kept per modality as that modality's tower does, a shared
    part as the text tower does (the only block init OpenCLIP writes down; its vision
    tower keeps the modules' own).
    """
    for proj in (model.visual_projection, model.text_projection):
        nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
    if model.cfg.share != "none":
        _clip(model.blocks, model.cfg.vision, "text")


def _normal(module: nn.Module, std: float) -> None:
    """weight ~ N(0, std), bias (if any) 0."""
    nn.init.normal_(module.weight, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def _own(module: nn.Module, name: str) -> nn.Parameter | None:
    """A tower's ``pos_embed`` / ``cls_token`` when it is a learned parameter (not a buffer, not absent)."""
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) else None


def _hf(module: nn.Module) -> None:
    """transformers' ``PreTrainedModel._init_weights``, which BERT and GPT-2 build on."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            _normal(m, HF_STD)
        elif isinstance(m, DEFAULT_INIT):
            m.reset_parameters()
    for name in ("pos_embed", "cls_token"):  # nn.Embedding tables (position_embeddings) in transformers
        if (p := _own(module, name)) is not None:
            nn.init.normal_(p, std=HF_STD)


def _bert(module: nn.Module, cfg: TransformerConfig, modality: str) -> None:
    _hf(module)
    token_embed = getattr(module, "token_embed", None)
    if isinstance(token_embed, nn.Embedding):
        with torch.no_grad():  # BERT's word embeddings have padding_idx, whose row transformers zeroes
            token_embed.weight[cfg.pad_token_id].zero_()


def _gpt2(module: nn.Module, cfg: TransformerConfig, modality: str) -> None:
    _hf(module)
    # GPT-2 paper: scale the layers that write into the residual stream by 1/sqrt(N), N = 2 per block
    std = HF_STD / (2 * cfg.depth) ** 0.5
    for m in module.modules():
        if isinstance(m, Attention):
            nn.init.normal_(m.proj.weight, std=std)
        elif isinstance(m, Mlp):
            nn.init.normal_(m.fc2.weight, std=std)


def _timm(module: nn.Module, cfg: TransformerConfig, modality: str) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):  # timm has no text tower: its tables follow its pos_embed
            trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, DEFAULT_INIT):
            m.reset_parameters()
    if (p := _own(module, "pos_embed")) is not None:
        trunc_normal_(p, std=0.02)
    if (p := _own(module, "cls_token")) is not None:
        nn.init.normal_(p, std=1e-6)


def _clip(module: nn.Module, cfg: TransformerConfig, modality: str) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, *DEFAULT_INIT)):
            m.reset_parameters()
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    attn_std, fc_std = cfg.width**-0.5, (2 * cfg.width) ** -0.5
    proj_std = attn_std * (2 * cfg.depth) ** -0.5
    for name, m in module.named_modules():
        # a part kept per modality sits in a ModuleDict under its modality's name
        text = next((s for s in name.split(".") if s in MODALITIES), modality) == "text"
        if isinstance(m, Attention):
            # OpenCLIP's blocks use nn.MultiheadAttention: zero biases, xavier-uniform in_proj
            inputs = (m.q, m.kv) if m.cross else (m.qkv,)
            for bias in (*(lin.bias for lin in inputs), m.proj.bias):
                if bias is not None:
                    nn.init.zeros_(bias)
            for lin in inputs:
                if text:
                    nn.init.normal_(lin.weight, std=attn_std)
                else:
                    nn.init.xavier_uniform_(lin.weight)
            if text:
                nn.init.normal_(m.proj.weight, std=proj_std)
        elif isinstance(m, Mlp) and text:  # weights only: the biases keep nn.Linear's default
            nn.init.normal_(m.fc1.weight, std=fc_std)
            nn.init.normal_(m.fc2.weight, std=proj_std)
    # text: TextTransformer.init_parameters; image: VisionTransformer's scale * randn
    pos_std = 0.01 if modality == "text" else cfg.width**-0.5
    if (p := _own(module, "pos_embed")) is not None:
        nn.init.normal_(p, std=pos_std)
    if (p := _own(module, "cls_token")) is not None:
        nn.init.normal_(p, std=cfg.width**-0.5)


FAMILIES: dict[str, Callable[[nn.Module, TransformerConfig, str], None]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "timm": _timm,
    "clip": _clip,
}
