"""CLIP: an image tower and a text tower projected into one embedding space.

With ``share != "none"`` the towers run on one ``Transformer`` owned here, whose
blocks hold each shared part once and the rest per modality::

    images -> visual (patch embed, positions) -+                      +-> visual_projection -+
                                               +-> blocks (shared) -> +                      +-> logits
    text   -> text (token embed, positions) ---+                      +-> text_projection ---+
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.config import CLIPConfig
from mmlm.layers import MODALITIES, Transformer
from mmlm.models.init import init_clip
from mmlm.models.text import TextEncoder
from mmlm.models.vision import VisionTransformer


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        shared = None
        if cfg.share != "none":
            # block shapes are equal in both towers (checked by CLIPConfig), so either config builds them
            self.blocks = shared = Transformer(cfg.vision, MODALITIES, cfg.share, cfg.shared_range)
        self.visual = VisionTransformer(cfg.vision, blocks=shared)
        self.text = TextEncoder(cfg.text, blocks=shared)
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

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B_img, D) x (B_txt, D) normalised features -> (B_img, B_txt) logits."""
        logits = self.scale() * image_features @ text_features.T
        return logits if self.logit_bias is None else logits + self.logit_bias

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image-text logits, (B_img, B_txt); transpose for text-image."""
        return self.logits(self.encode_image(images), self.encode_text(input_ids, attention_mask))
