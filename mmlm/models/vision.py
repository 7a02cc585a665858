"""VisionTransformer: conv patch embedding -> (class token, positions) -> shared Blocks -> pool -> head.

Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``norm_pre``, ``blocks``, ``norm``, ``head``), so timm checkpoints load by renaming
nothing and OpenAI/OpenCLIP ones by a short table.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from mmlm.config import VisionConfig
from mmlm.layers import Transformer
from mmlm.models.init import init_weights


class PatchDropout(nn.Module):
    """Keep a random subset of patch tokens while training (FLIP); prefix tokens always stay."""

    def __init__(self, prob: float, num_prefix_tokens: int = 1):
        super().__init__()
        assert 0 <= prob < 1, "patch dropout must be in [0, 1)"
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0:
            return x
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, N, C = patches.shape
        keep = max(1, int(N * (1 - self.prob)))
        idx = torch.rand(B, N, device=x.device).topk(keep, dim=-1).indices  # (B, keep)
        patches = patches.gather(1, idx[..., None].expand(-1, -1, C))
        return torch.cat([prefix, patches], dim=1)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, width) with one strided conv."""

    def __init__(self, patch_size: int, in_chans: int, width: int, bias: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, width)


class VisionTransformer(nn.Module):
    """ViT. ``forward_features`` -> (B, 1 + N, width) tokens, ``pool`` -> (B, width), ``head``."""

    modality = "image"

    def __init__(self, cfg: VisionConfig, blocks: Transformer | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_prefix_tokens = int(cfg.class_token)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.width, cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_prefix_tokens + cfg.grid_size**2, cfg.width))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.patch_drop = PatchDropout(cfg.patch_dropout, self.num_prefix_tokens)
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.norm_pre else nn.Identity()
        if blocks is None:
            self.blocks = Transformer(cfg, modalities=("image",))
        else:
            object.__setattr__(self, "blocks", blocks)  # shared: owned (and saved) by the CLIP
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(cfg.width, cfg.num_classes) if cfg.num_classes else nn.Identity()
        init_weights(self, cfg, self.modality)  # shared blocks are not registered here: their owner initialises them

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations (timm's name)."""
        self.blocks.grad_checkpointing = enable

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if grid != (self.cfg.grid_size, self.cfg.grid_size):
            # another resolution: bicubic resampling of the learned grid, prefix tokens untouched
            pos = resample_abs_pos_embed(
                pos, new_size=list(grid), old_size=[self.cfg.grid_size] * 2, num_prefix_tokens=self.num_prefix_tokens
            )
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, width); N shrinks under patch dropout in training."""
        self.check_images(images)
        H, W = images.shape[-2:]
        p = self.cfg.patch_size
        x = self.patch_embed(images)  # (B, N, width)
        x = self._pos_embed(x, (H // p, W // p))
        x = self.norm_pre(self.patch_drop(x))
        x = self.blocks(x, self.modality)
        # gap pools first and normalises the mean (timm's fc_norm); cls normalises every token
        return x if self.cfg.pool == "gap" else self.norm(x)

    def check_images(self, images: torch.Tensor) -> None:
        """One clear error for a batch the model cannot take (read from the shape alone: no device sync)."""
        C, p, size = self.cfg.in_chans, self.cfg.patch_size, self.cfg.image_size
        if images.dim() != 4 or images.shape[1] != C:
            hint = "; wrap a single image as images[None]" if images.dim() == 3 else ""
            raise ValueError(f"expected images of shape (batch, {C}, height, width), got {tuple(images.shape)}{hint}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point (normalised pixels), got {images.dtype}")
        H, W = images.shape[-2:]
        if H % p or W % p:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the patch size {p}: resize or crop to a multiple "
                f"of {p} (the model's own image_size is {size}x{size})"
            )

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "gap":
            return self.norm(x[:, self.num_prefix_tokens :].mean(1))
        return x[:, 0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (no head) or class logits (with ``num_classes``)."""
        return self.forward_head(self.forward_features(images))
