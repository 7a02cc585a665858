"""CLIP: an image tower and a text tower projected into one embedding space.

With ``share != "none"`` the towers run on one ``Transformer`` owned here, whose
blocks hold each shared part once and the rest per modality::

    images -> visual (patch embed, positions) -+                      +-> visual_projection -+
                                               +-> blocks (shared) -> +                      +-> CLIPOutput
    text   -> text (token embed, positions) ---+                      +-> text_projection ---+
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.config import CLIPConfig, CoCaConfig
from mmlm.layers import MODALITIES, Transformer
from mmlm.models.init import init_clip
from mmlm.models.text import TextEncoder
from mmlm.models.vision import VisionTransformer


@dataclass
class CLIPOutput:
    """What ``CLIP.forward`` returns, named as transformers' ``CLIPModel`` output (OpenCLIP's forward
    returns the same four as a tuple). A loss that takes the embeddings (``mmlm.losses``) never builds
    the logits: they are computed on first access only."""

    image_embeds: torch.Tensor | None  # (B_img, embed_dim), L2-normalised; None when called without images
    text_embeds: torch.Tensor | None  # (B_txt, embed_dim), L2-normalised; None when called without text
    logit_scale: torch.Tensor  # exp(logit_scale), clamped: the factor the logits use
    logit_bias: torch.Tensor | None  # SigLIP's learned bias; None for CLIP

    @cached_property
    def logits_per_image(self) -> torch.Tensor:
        """(B_img, B_txt): ``logit_scale * image_embeds @ text_embeds.T (+ logit_bias)``."""
        if self.image_embeds is None or self.text_embeds is None:
            missing = "images" if self.image_embeds is None else "input_ids"
            raise ValueError(f"logits need images and text; this output was computed without {missing}")
        logits = self.logit_scale * self.image_embeds @ self.text_embeds.T
        return logits if self.logit_bias is None else logits + self.logit_bias

    @property
    def logits_per_text(self) -> torch.Tensor:
        """(B_txt, B_img)."""
        return self.logits_per_image.T


def add_towers(model: nn.Module, cfg: CLIPConfig | CoCaConfig) -> None:
    """``model.visual`` and ``model.text``, and ``model.blocks`` where they share them (``cfg.share``): the two
    towers of every image-text model (CLIP, CoCa), under the same parameter names."""
    shared = None
    if cfg.share != "none":
        # block shapes are equal in both towers (checked by the config), so either config builds them
        model.blocks = shared = Transformer(cfg.vision, MODALITIES, cfg.share, cfg.shared_range)
    model.visual = VisionTransformer(cfg.vision, blocks=shared)
    model.text = TextEncoder(cfg.text, blocks=shared)


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        add_towers(self, cfg)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None if cfg.init_logit_bias is None else nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        init_clip(self)  # the towers initialised themselves

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint both towers' blocks (shared ones are set twice, to the same value)."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim)."""
        x = self.visual_projection(self.visual.pool(self.visual.forward_features(images)))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, embed_dim); padding columns beyond the longest text are dropped."""
        x = self.text_projection(self.text(input_ids, attention_mask))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at exp(max_logit_scale) = 100 as in CLIP."""
        return self.logit_scale.clamp(0, self.cfg.max_logit_scale).exp()

    def forward(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> CLIPOutput:
        """Normalised embeddings of the images and/or texts given, with the scale and bias the logits use."""
        if images is None and input_ids is None:
            raise ValueError("CLIP.forward needs images, input_ids or both; got neither")
        return CLIPOutput(
            image_embeds=None if images is None else self.encode_image(images),
            text_embeds=None if input_ids is None else self.encode_text(input_ids, attention_mask),
            logit_scale=self.scale(),
            logit_bias=self.logit_bias,
        )
