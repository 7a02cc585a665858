"""Attention probabilities out of the one SDPA path, and attention rollout.

``mmlm.layers.Attention`` never forms the softmax (``scaled_dot_product_attention`` fuses it), so
``record_attention`` recomputes it in a forward hook from the block's own ``qkv`` on the same input:
the model's forward is untouched, and the recorded matrix times the values is what SDPA returned
(tests check this against SDPA itself).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mmlm.layers import Attention


def tower_attentions(blocks: nn.Module, modality: str) -> list[Attention]:
    """The ``Attention`` module each block runs for ``modality`` (shared or its own), first block first."""
    out = []
    for block in blocks:
        attn = block.attn[modality] if isinstance(block.attn, nn.ModuleDict) else block.attn
        out.append(attn)
    return out


def attention_probs(
    attn: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) of ``attn`` on input ``x`` (B, T, C), with SDPA's mask semantics
    (boolean, True = attend); (B, heads, T, T)."""
    B, T, C = x.shape
    q, k, _ = attn.qkv(x).view(B, T, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // attn.heads)  # (B, heads, T, T)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1)


@contextmanager
def record_attention(blocks: nn.Module, modality: str = "image") -> Iterator[list[torch.Tensor]]:
    """Collect each block's attention probabilities (B, heads, T, T) while the ``with`` body runs a forward.

    >>> with record_attention(clip.visual.blocks) as maps:
    ...     clip.encode_image(images)
    """
    maps: list[torch.Tensor] = []

    def hook(module: Attention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        call = inspect.signature(module.forward).bind(*args, **kwargs)  # as Block passed them
        wanted = {k: v for k, v in call.arguments.items() if k in ("x", "attn_mask", "is_causal")}  # not its cache
        maps.append(attention_probs(module, **wanted))

    handles = [attn.register_forward_hook(hook, with_kwargs=True) for attn in tower_attentions(blocks, modality)]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): head-averaged attention plus the residual identity,
    rows renormalised, multiplied from the first layer up; (B, T, T), row i = where token i's output
    came from in the input tokens."""
    out = None
    for probs in maps:
        a = probs.mean(1)  # (B, T, T)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    if out is None:
        raise ValueError("rollout needs the attention of at least one block")
    return out
