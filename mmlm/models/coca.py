"""CoCa: a CLIP that also captions (Yu et al. 2022, as OpenCLIP's ``coca_model.py`` builds it).

Every transformer layer is ``mmlm.layers.Block``; the decoder's blocks switch cross-attention on::

    images -> visual (ViT, no final norm) -> attn_pool (Q queries) -> pool_norm -+-> [0]  -> visual_projection -> image_embeds
                                                                                 +-> [1:] image tokens ---------------+
    text + cls -> text (causal Blocks) -+-> norm([cls]) -> text_projection -> text_embeds                             |
                                        +-> tokens (no norm) -> decoder (self Block, cross Block) x depth <-----------+
                                                                -> decoder_norm -> lm_head -> logits (next token)

With ``share != "none"`` the image and text towers run on one shared ``Transformer`` as in ``CLIP``;
the decoder is CoCa's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.config import CoCaConfig
from mmlm.layers import AttentionalPooler, Transformer
from mmlm.models.clip import CLIPOutput, add_towers
from mmlm.models.init import init_clip, init_weights

IGNORE_INDEX = -100  # what F.cross_entropy skips: the labels of padding


@dataclass
class CoCaOutput(CLIPOutput):
    """``CLIPOutput`` plus the captioning side, named as transformers names it: ``logits`` (B, T - 1, vocab)
    predict ``labels`` (B, T - 1) = ``input_ids[:, 1:]`` (teacher forcing), padding labelled -100.
    Both are None unless images and text were given."""

    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class DecodeState:
    """What ``CoCa.next_token_logits`` carries from one decoding step to the next (``mmlm.generate``)."""

    image_tokens: torch.Tensor  # (B, Q - 1, embed_dim): what the decoder attends to
    cache: list[list[dict[str, torch.Tensor]]] | None  # [text tower blocks, decoder blocks]; None: recompute
    seen: int = 0  # tokens already in the cache


class CoCa(nn.Module):
    def __init__(self, cfg: CoCaConfig):
        super().__init__()
        self.cfg = cfg
        add_towers(self, cfg)
        self.text_cls = nn.Parameter(torch.empty(cfg.text.width))  # appended after each text (OpenCLIP's cls_emb)
        self.attn_pool = AttentionalPooler(
            cfg.embed_dim, cfg.vision.width, cfg.pool_heads, cfg.pool_queries, cfg.vision.norm_eps
        )
        self.pool_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.vision.norm_eps)  # OpenCLIP's ln_post, after the pooler
        self.visual_projection = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        d = cfg.decoder
        self.decoder = Transformer(d, ("text",), cross_attention=True, context_dim=cfg.embed_dim)
        self.decoder_norm = nn.LayerNorm(d.width, eps=d.norm_eps)
        self.lm_head = nn.Linear(d.width, d.vocab_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (
            None if cfg.init_logit_bias is None else nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """The towers initialised themselves; the rest as OpenCLIP's text side (its decoder writes no init of its
        own and leaves ``text_projection`` uninitialised: N(0, width^-1/2) here, as its text tower's projection)."""
        init_clip(self)
        nn.init.normal_(self.text_cls, std=0.01)
        init_weights(self.decoder, self.cfg.decoder, "text")
        for norm in (self.decoder_norm, self.pool_norm, self.attn_pool.norm_q, self.attn_pool.norm_kv):
            norm.reset_parameters()
        nn.init.normal_(self.attn_pool.query, std=1.0)  # torch.randn, as OpenCLIP
        for lin in (self.attn_pool.attn.q, self.attn_pool.attn.kv):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.attn_pool.attn.proj.bias)
        nn.init.normal_(self.lm_head.weight, std=self.cfg.decoder.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at exp(max_logit_scale) = 100 as in CLIP."""
        return self.logit_scale.clamp(0, self.cfg.max_logit_scale).exp()

    # ---------------------------------------------------------------------------- image side

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> pooled (B, embed_dim) before the projection, and image tokens (B, Q - 1, embed_dim)."""
        x = self.visual.forward_features(images)  # (B, 1 + N, vision width); the pooler normalises its input
        x = self.pool_norm(self.attn_pool(x))  # (B, Q, embed_dim)
        return x[:, 0], x[:, 1:]

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim)."""
        x = self.visual_projection(self.image_features(images)[0])
        return F.normalize(x, dim=-1) if normalize else x

    # ---------------------------------------------------------------------------- text side

    def _valid(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) True at real tokens: the mask if given, else OpenCLIP's rule ``ids != pad_id``."""
        return input_ids != self.cfg.text.pad_token_id if attention_mask is None else attention_mask.bool()

    def _text_mask(self, valid: torch.Tensor) -> torch.Tensor | None:
        """The (B, 1, T + 1, T + 1) causal + padding mask of the text and its class token; None when causal suffices."""
        if bool(valid.all()):
            return None
        B, T = valid.shape
        ones = valid.new_ones(B, 1)
        # legacy: OpenCLIP puts the class token's column first, so every padding column is shifted by one
        keys = torch.cat([ones, valid] if self.cfg.legacy_cls_mask else [valid, ones], 1)  # (B, T + 1)
        mask = keys[:, None, None, :] & torch.ones(T + 1, T + 1, dtype=torch.bool, device=valid.device).tril()
        return mask | ~mask.any(-1, keepdim=True)  # a row without any key would answer NaN

    def text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> pooled (B, width) (the normalised class token, before the projection) and the
        un-normalised token states (B, T, width) the decoder reads.

        Padding is not trimmed: as in OpenCLIP the class token sits after the last column, so its
        position depends on how far the batch is padded.
        """
        text = self.text
        text.check_inputs(input_ids, attention_mask)
        B, T = input_ids.shape
        if T > self.cfg.max_text_length:
            raise ValueError(f"sequence length {T} exceeds CoCa's text length {self.cfg.max_text_length}")
        x = text.token_embed(input_ids)  # (B, T, width)
        x = torch.cat([x, self.text_cls.to(x.dtype).expand(B, 1, -1)], 1)  # (B, T + 1, width)
        x = text.drop(text.norm_embed(x + text.pos_embed[: T + 1]))
        mask = self._text_mask(self._valid(input_ids, attention_mask))
        x = text.blocks(x, "text", mask, mask is None)
        return text.norm(x[:, -1]), x[:, :-1]

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, embed_dim)."""
        x = self.text_projection(self.text_features(input_ids, attention_mask)[0])
        return F.normalize(x, dim=-1) if normalize else x

    # ---------------------------------------------------------------------------- decoder

    def decode(
        self, text_tokens: torch.Tensor, image_tokens: torch.Tensor, cache: list[dict[str, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Text tower states (B, T, width) attending to image tokens (B, S, embed_dim) -> logits (B, T, vocab)."""
        x = self.decoder(text_tokens, "text", None, True, context=image_tokens, cache=cache)
        return self.lm_head(self.decoder_norm(x))

    def forward(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> CoCaOutput:
        """Embeddings of the images and/or texts given and, with both, the caption logits and labels."""
        if images is None and input_ids is None:
            raise ValueError("CoCa.forward needs images, input_ids or both; got neither")
        image_embeds = text_embeds = logits = labels = image_tokens = None
        if images is not None:
            pooled, image_tokens = self.image_features(images)
            image_embeds = F.normalize(self.visual_projection(pooled), dim=-1)
        if input_ids is not None:
            pooled, tokens = self.text_features(input_ids, attention_mask)
            text_embeds = F.normalize(self.text_projection(pooled), dim=-1)
            if image_tokens is not None:
                logits = self.decode(tokens[:, :-1], image_tokens)  # position t predicts token t + 1
                valid = self._valid(input_ids, attention_mask)[:, 1:]
                labels = input_ids[:, 1:].masked_fill(~valid, IGNORE_INDEX)
        return CoCaOutput(image_embeds, text_embeds, self.scale(), self.logit_bias, logits=logits, labels=labels)

    # ---------------------------------------------------------------------------- generation

    def start_decoding(self, images: torch.Tensor, use_cache: bool = True) -> DecodeState:
        """The image tokens of ``images`` and, with ``use_cache``, empty per-block caches (``mmlm.generate``)."""
        image_tokens = self.image_features(images)[1]
        cache = [[{} for _ in self.text.blocks], [{} for _ in self.decoder]] if use_cache else None
        return DecodeState(image_tokens, cache)

    def next_token_logits(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """(B, T) the caption so far -> (B, vocab) logits of the next token.

        With a cache only the tokens not seen yet run through the text tower and the decoder; the
        image tokens' keys and values in the cross-attention blocks are computed on the first step.
        Without, the whole caption runs again (as OpenCLIP's ``generate`` does).
        """
        if state.cache is None:
            _, tokens = self.text_features(input_ids)
            return self.decode(tokens, state.image_tokens)[:, -1]
        text = self.text
        new = input_ids[:, state.seen :]
        T = input_ids.shape[1]
        if T > self.cfg.max_text_length:
            raise ValueError(f"caption length {T} exceeds CoCa's text length {self.cfg.max_text_length}")
        x = text.drop(text.norm_embed(text.token_embed(new) + text.pos_embed[state.seen : T]))  # (B, new, width)
        # a caption holds no padding while it grows, so the text tower's mask is plain causal
        x = text.blocks(x, "text", None, True, cache=state.cache[0])
        state.seen = T
        return self.decode(x, state.image_tokens, cache=state.cache[1])[:, -1]

    def reorder_state(self, state: DecodeState, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the self-attention caches (beam search). Image tokens and the decoder's
        cross-attention keys and values are the same for every beam of an image: left alone."""
        if state.cache is None:
            return
        self_attn = [*state.cache[0], *state.cache[1][0::2]]
        for c in self_attn:
            for key in c:
                c[key] = c[key].index_select(0, index)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Captions of ``images`` as token ids (B, L): see ``mmlm.generate.generate`` for the options."""
        from mmlm.generate import generate

        return generate(self, images, **kwargs)
