"""The one Transformer block of mmlm, bottom-up: Attention -> Mlp -> Block -> Transformer.

Mask semantics, stated once: a boolean mask is True where a query may attend to a key.
A ``Block`` may serve several modalities (``"image"``, ``"text"``); each of its parts is
either one module used by all of them (shared) or a ``ModuleDict`` holding one module
per modality. Shared parts therefore exist once in the state dict, with no aliasing.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from mmlm.config import Share, TransformerConfig

MODALITIES = ("image", "text")

# Which Block parts each sharing mode shares across modalities.
SHARED_PARTS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "attention": frozenset({"norm1", "attn", "ls1"}),  # VLMo multiway: own norm2 + MLP
    "attention_mlp": frozenset({"attn", "ls1", "mlp", "ls2"}),  # MS-CLIP: own LayerNorms
    "all": frozenset({"norm1", "attn", "ls1", "norm2", "mlp", "ls2"}),  # one tower
}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI trained CLIP with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
}


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection + ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, hd)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj_drop(self.proj(x))


def build_attn_mask(
    padding_mask: torch.Tensor | None, causal: bool, seq_len: int
) -> tuple[torch.Tensor | None, bool]:
    """Turn a (B, T) key-padding mask (True = real token) and causality into SDPA arguments.

    Returns ``(attn_mask, is_causal)``; with no padding the fused kernels get ``is_causal``
    alone, with padding one boolean (B, 1, T, T) or (B, 1, 1, T) mask is built once per
    forward and shared by every block.
    """
    if padding_mask is None or bool(padding_mask.all()):
        return None, causal
    mask = padding_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        tril = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril()
        mask = mask & tril  # (B, 1, T, T)
        # a left-padded text's padding rows see no key at all; some SDPA kernels answer NaN there, which
        # would leak into real tokens through 0 * NaN. Let such rows see every key: their output is unused
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask, False


class Block(nn.Module):
    """Transformer block, pre-LN or post-LN, serving one or several modalities.

    pre-LN:  x = x + ls1(attn(norm1(x)));  x = x + ls2(mlp(norm2(x)))
    post-LN: x = norm1(x + attn(x));       x = norm2(x + mlp(x))          (BERT)
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        modalities: Sequence[str] = ("image",),
        share: Share = "none",
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.modalities = tuple(modalities)
        shared = SHARED_PARTS[share] if len(self.modalities) > 1 else SHARED_PARTS["all"]

        def part(name: str, make: Callable[[], nn.Module]) -> nn.Module:
            if name in shared:
                return make()
            return nn.ModuleDict({m: make() for m in self.modalities})

        ls = (lambda: LayerScale(cfg.width, cfg.layer_scale)) if cfg.layer_scale else nn.Identity
        self.norm1 = part("norm1", lambda: nn.LayerNorm(cfg.width, eps=cfg.norm_eps))
        self.attn = part("attn", lambda: Attention(cfg.width, cfg.heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout))
        self.ls1 = part("ls1", ls)
        self.norm2 = part("norm2", lambda: nn.LayerNorm(cfg.width, eps=cfg.norm_eps))
        self.mlp = part(
            "mlp", lambda: Mlp(cfg.width, cfg.mlp_dim, act_layer=ACTIVATIONS[cfg.act], drop=(0.0, cfg.dropout))
        )
        self.ls2 = part("ls2", ls)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        modality: str | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        modality = modality or self.modalities[0]
        norm1, attn, ls1, norm2, mlp, ls2 = (
            p[modality] if isinstance(p, nn.ModuleDict) else p
            for p in (self.norm1, self.attn, self.ls1, self.norm2, self.mlp, self.ls2)
        )
        if self.pre_norm:
            x = x + self.drop_path(ls1(attn(norm1(x), attn_mask, is_causal)))
            x = x + self.drop_path(ls2(mlp(norm2(x))))
        else:
            x = norm1(x + self.drop_path(ls1(attn(x, attn_mask, is_causal))))
            x = norm2(x + self.drop_path(ls2(mlp(x))))
        return x


class Transformer(nn.ModuleList):
    """A stack of ``Block``s; layers in ``shared_range`` share parts across ``modalities``.

    Layers outside the range keep a full block per modality, so one ``Transformer``
    serves both towers of a CLIP whose sharing covers only some layers. It is a
    ``ModuleList`` so that parameters read ``blocks.N.attn.qkv.weight`` as in timm.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        modalities: Sequence[str] = ("image",),
        share: Share = "none",
        shared_range: tuple[int, int] = (0, 0),
    ):
        start, stop = shared_range
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        super().__init__(
            Block(cfg, modalities, share if start <= i < stop else "none", drop_path=rates[i]) for i in range(cfg.depth)
        )
        self.modalities = tuple(modalities)
        self.grad_checkpointing = False  # set through the models' set_grad_checkpointing, as in timm

    def forward(
        self,
        x: torch.Tensor,
        modality: str | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        for block in self:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, modality, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, modality, attn_mask, is_causal)
        return x
