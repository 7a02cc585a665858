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
    """Multi-head attention on ``scaled_dot_product_attention``: self-attention or cross-attention.

    Self-attention (``context_dim=None``) projects q, k, v with one fused ``qkv`` Linear.
    Cross-attention (``context_dim`` given) takes its queries from ``x`` and its keys and values
    from another sequence (``context``, e.g. image tokens), possibly of another width, through
    ``q`` and ``kv`` Linears (timm's ``CrossAttention`` names).

    ``cache`` (a dict, one per layer) makes incremental decoding cheap: self-attention appends
    the new keys and values to those of earlier steps; cross-attention computes the context's
    keys and values on the first call and reuses them afterwards.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        context_dim: int | None = None,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(width, width, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * width, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``context``: (B, S, context_dim) tokens to attend to (cross-attention only), or a function
        returning them, called only when the cache does not hold their keys and values yet."""
        B, T, C = x.shape
        heads, hd = self.heads, C // self.heads
        if self.cross:
            q = self.q(x).view(B, T, heads, hd).transpose(1, 2)  # (B, heads, T, hd)
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                ctx = context() if callable(context) else context
                if ctx is None:
                    raise ValueError("cross-attention needs context tokens")
                k, v = self.kv(ctx).view(B, ctx.shape[1], 2, heads, hd).permute(2, 0, 3, 1, 4)  # 2 x (B, heads, S, hd)
                if cache is not None:
                    cache["k"], cache["v"] = k, v
        else:
            q, k, v = self.qkv(x).view(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, hd)
            if cache is not None:
                if "k" in cache:
                    past = cache["k"].shape[2]
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                    if is_causal and T > 1:  # new queries see every past key and the new ones up to themselves
                        attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
                    is_causal = False  # a single new query may see every key there is
                cache["k"], cache["v"] = k, v
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj_drop(self.proj(x))


def build_attn_mask(
    padding_mask: torch.Tensor | None, causal: bool, seq_len: int, always: bool = False
) -> tuple[torch.Tensor | None, bool]:
    """Turn a (B, T) key-padding mask (True = real token) and causality into SDPA arguments.

    Returns ``(attn_mask, is_causal)``; with no padding the fused kernels get ``is_causal``
    alone, with padding one boolean (B, 1, T, T) or (B, 1, 1, T) mask is built once per
    forward and shared by every block. ``always``: build the mask without looking at its values
    (an exported graph cannot hold the "no padding" shortcut, a decision on values).
    """
    if padding_mask is None or (not always and bool(padding_mask.all())):
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

    With ``cross_attention`` the attention sublayer attends to ``context`` (the other modality's
    tokens, normalised by ``norm1_kv``) instead of to ``x``: ``x = x + ls1(attn(norm1(x), norm1_kv(context)))``.
    This is OpenCLIP's ``ResidualAttentionBlock(is_cross_attention=True)``; a CoCa decoder layer is a
    self-attention Block followed by a cross-attention Block (``Transformer(cross_attention=True)``).
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        modalities: Sequence[str] = ("image",),
        share: Share = "none",
        drop_path: float = 0.0,
        cross_attention: bool = False,
        context_dim: int | None = None,
    ):
        super().__init__()
        if cross_attention and not cfg.pre_norm:
            raise ValueError("cross-attention blocks are pre-LN (as in CoCa)")
        self.pre_norm = cfg.pre_norm
        self.modalities = tuple(modalities)
        self.cross_attention = cross_attention
        shared = SHARED_PARTS[share] if len(self.modalities) > 1 else SHARED_PARTS["all"]

        def part(name: str, make: Callable[[], nn.Module]) -> nn.Module:
            if name in shared:
                return make()
            return nn.ModuleDict({m: make() for m in self.modalities})

        ls = (lambda: LayerScale(cfg.width, cfg.layer_scale)) if cfg.layer_scale else nn.Identity
        context_dim = (context_dim or cfg.width) if cross_attention else None
        self.norm1 = part("norm1", lambda: nn.LayerNorm(cfg.width, eps=cfg.norm_eps))
        if cross_attention:
            self.norm1_kv = part("norm1", lambda: nn.LayerNorm(context_dim, eps=cfg.norm_eps))
        self.attn = part(
            "attn", lambda: Attention(cfg.width, cfg.heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout, context_dim)
        )
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
        context: torch.Tensor | None = None,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``context``: (B, S, context_dim) tokens a cross-attention block attends to (ignored otherwise);
        ``cache``: this block's keys and values from earlier decoding steps (see ``Attention``)."""
        modality = modality or self.modalities[0]
        pick = lambda p: p[modality] if isinstance(p, nn.ModuleDict) else p  # noqa: E731
        norm1, attn, ls1, norm2, mlp, ls2 = map(pick, (self.norm1, self.attn, self.ls1, self.norm2, self.mlp, self.ls2))
        if self.cross_attention:
            norm_kv = pick(self.norm1_kv)
            # a cached decoding step reuses the context's keys and values: normalise it only when needed
            kv = lambda: norm_kv(context)  # noqa: E731
            x = x + self.drop_path(ls1(attn(norm1(x), context=kv, cache=cache)))
        elif self.pre_norm:
            x = x + self.drop_path(ls1(attn(norm1(x), attn_mask, is_causal, cache=cache)))
        else:
            x = norm1(x + self.drop_path(ls1(attn(x, attn_mask, is_causal, cache=cache))))
            return norm2(x + self.drop_path(ls2(mlp(x))))
        return x + self.drop_path(ls2(mlp(norm2(x))))


class Transformer(nn.ModuleList):
    """A stack of ``Block``s; layers in ``shared_range`` share parts across ``modalities``.

    Layers outside the range keep a full block per modality, so one ``Transformer``
    serves both towers of a CLIP whose sharing covers only some layers. It is a
    ``ModuleList`` so that parameters read ``blocks.N.attn.qkv.weight`` as in timm.

    With ``cross_attention`` each of the ``depth`` layers is two Blocks, a self-attention one
    (even index) and one attending to the ``context`` tokens (odd index): a multimodal decoder.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        modalities: Sequence[str] = ("image",),
        share: Share = "none",
        shared_range: tuple[int, int] = (0, 0),
        cross_attention: bool = False,
        context_dim: int | None = None,
    ):
        start, stop = shared_range
        per_layer = 2 if cross_attention else 1
        n = cfg.depth * per_layer
        rates = torch.linspace(0, cfg.drop_path, n).tolist()
        super().__init__(
            Block(
                cfg, modalities, share if start <= i // per_layer < stop else "none", drop_path=rates[i],
                cross_attention=cross_attention and i % 2 == 1, context_dim=context_dim,
            )  # fmt: skip
            for i in range(n)
        )
        self.modalities = tuple(modalities)
        self.grad_checkpointing = False  # set through the models' set_grad_checkpointing, as in timm

    def forward(
        self,
        x: torch.Tensor,
        modality: str | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        cache: list[dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """``cache``: one dict per block, filled and reused across decoding steps (``mmlm.generate``)."""
        for i, block in enumerate(self):
            block_cache = None if cache is None else cache[i]
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, modality, attn_mask, is_causal, context, block_cache, use_reentrant=False
                )
            else:
                x = block(x, modality, attn_mask, is_causal, context, block_cache)
        return x


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries attend to a sequence: (B, S, context_dim) -> (B, n_queries, width).

    OpenCLIP's ``AttentionalPooler`` (CoCa's image tower): ``attn(norm_q(query), norm_kv(x))``, with no
    residual and no MLP. It is the cross-attention of ``Attention``, so it shares the one SDPA path.
    """

    def __init__(self, width: int, context_dim: int, heads: int = 8, n_queries: int = 256, norm_eps: float = 1e-5):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, width))
        self.norm_q = nn.LayerNorm(width, eps=norm_eps)
        self.norm_kv = nn.LayerNorm(context_dim, eps=norm_eps)
        self.attn = Attention(width, heads, context_dim=context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.query).expand(x.shape[0], -1, -1)  # (B, n_queries, width)
        return self.attn(q, context=self.norm_kv(x))
