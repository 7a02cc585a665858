"""TextEncoder: token (+ position, + type) embeddings -> shared Blocks -> pooling.

One class covers the CLIP text tower (causal, pooled at end-of-text), GPT-2 (causal,
last token) and BERT / MiniLM (bidirectional, post-LN, token types, cls, mean or max),
and, with ``normalize`` / ``max_seq_length`` / ``do_lower_case``, a sentence-transformers
model: ``encode(texts, tokenizer)`` gives what its ``encode`` gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.config import TextConfig
from mmlm.layers import Transformer, build_attn_mask
from mmlm.models.init import init_weights

if TYPE_CHECKING:
    from mmlm.data.tokenizers import Tokenizer


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need"; (length, width)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: width // 2])
    return table


def check_shapes(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """What a text batch must look like, checked without reading its values (no device sync)."""
    if input_ids.dim() != 2:
        hint = "; wrap the ids of a single text as ids[None]" if input_ids.dim() == 1 else ""
        raise ValueError(f"expected token ids of shape (batch, length), got shape {tuple(input_ids.shape)}{hint}")
    if 0 in input_ids.shape:
        raise ValueError(f"got no token ids: input_ids has shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int):
        raise TypeError(f"token ids must be integers (torch.long or torch.int), got {input_ids.dtype}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
            "they must be equal"
        )


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids that start at 0 on each text's first real token; padding before it gets 0.

    A left-padded text then sits at the positions it has alone, as transformers' GPT-2 generation
    places it (``attention_mask.cumsum(-1) - 1``). Counting from the first real token rather than
    summing the mask keeps a right-padded batch at 0..T-1 everywhere, padding included, so its
    outputs stay exactly those of a batch without position ids.
    """
    first = attention_mask.int().argmax(-1, keepdim=True)  # (B, 1): leading padding columns
    return (torch.arange(attention_mask.shape[1], device=attention_mask.device) - first).clamp(min=0)


class TextEncoder(nn.Module):
    """Text Transformer. ``forward_features`` -> per-token states, ``pool`` -> (B, width).

    ``blocks`` may be a ``Transformer`` owned by someone else (a CLIP whose towers share
    weights); it is then used but not registered here, so its parameters appear once,
    under the owner.
    """

    modality = "text"

    def __init__(self, cfg: TextConfig, blocks: Transformer | None = None):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        else:
            self.register_buffer("pos_embed", sinusoidal_positions(cfg.context_length, cfg.width), persistent=False)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.width) if cfg.type_vocab_size else None
        self.norm_embed = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.embed_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        if blocks is None:
            self.blocks = Transformer(cfg, modalities=("text",))
        else:
            object.__setattr__(self, "blocks", blocks)  # shared: owned (and saved) by the CLIP
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        init_weights(self, cfg, self.modality)  # shared blocks are not registered here: their owner initialises them

    def forward_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, width) states after the final norm.

        ``attention_mask`` is the usual (B, T) padding mask (1 = real token).
        ``attn_mask`` overrides it with a full boolean (B, 1, T, T) mask, e.g. the
        block-diagonal mask of packed documents.
        """
        left_padded = self.check_inputs(input_ids, attention_mask)
        B, T = input_ids.shape
        if position_ids is None and left_padded:
            # left-padded: count positions from each text's first real token. Only then: the gather's
            # backward accumulates in no fixed order, while pos_embed[:T] keeps training bit-reproducible
            position_ids = real_positions(attention_mask)
        if attn_mask is not None:
            is_causal = False
        else:
            attn_mask, is_causal = build_attn_mask(attention_mask, self.cfg.causal, T)
        return self.states(input_ids, attn_mask, is_causal, token_type_ids, position_ids)

    def states(
        self,
        input_ids: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeddings -> blocks -> final norm, (B, T, width), on checked inputs and a built mask: the body of
        ``forward_features``, and all of it that an exported graph (``mmlm.export.onnx``) runs."""
        T = input_ids.shape[1]
        x = self.token_embed(input_ids)  # (B, T, width)
        x = x + (self.pos_embed[:T] if position_ids is None else self.pos_embed[position_ids])
        if self.type_embed is not None:
            x = x + self.type_embed(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        x = self.drop(self.norm_embed(x))
        x = self.blocks(x, self.modality, attn_mask, is_causal)
        return self.norm(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations (timm's name)."""
        self.blocks.grad_checkpointing = enable

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        """One clear error for ids or a mask the model cannot take, at one device sync for all of them.

        Returns whether any text of the batch is left-padded, read in the same sync.
        """
        check_shapes(input_ids, attention_mask)
        if input_ids.shape[1] > self.cfg.context_length:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds context_length {self.cfg.context_length}"
            )
        stats = [input_ids.min().long(), input_ids.max().long()]
        if attention_mask is not None:
            stats.append((attention_mask == 0).all(-1).sum())  # texts without a real token
            stats.append((attention_mask[:, 0] == 0).sum())  # texts starting with padding
        low, high, *mask_stats = torch.stack(stats).tolist()
        empty, left = mask_stats or (0, 0)
        vocab = self.cfg.vocab_size
        if low < 0 or high >= vocab:
            raise ValueError(
                f"token id {low if low < 0 else high} is outside the vocabulary "
                f"(vocab_size {vocab}: ids 0..{vocab - 1}); were the texts tokenised for another model?"
            )
        if empty:
            raise ValueError(
                f"attention_mask marks no real token in {empty} of {len(input_ids)} texts; "
                "each text needs at least one 1 (1 = real token, 0 = padding)"
            )
        return left > 0

    def pool(self, x: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, width) -> (B, width) by the configured pooling."""
        kind = self.cfg.pool
        if kind == "cls":
            return x[:, 0]
        if kind == "mean":
            if attention_mask is None:
                return x.mean(1)
            m = attention_mask.to(x.dtype)[..., None]
            return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if kind == "max":
            if attention_mask is None:
                return x.amax(1)
            return x.masked_fill(attention_mask[..., None] == 0, float("-inf")).amax(1)
        if kind == "eot":
            # first end-of-text token (OpenAI's argmax(ids) finds the same one: eot is the largest id)
            idx = (input_ids == self.cfg.eot_token_id).int().argmax(-1)
        elif attention_mask is None:  # "last" token
            idx = torch.full_like(input_ids[:, 0], -1)
        else:  # "last" real token: the last column whose mask is 1 (argmax finds the first maximum)
            columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            idx = (attention_mask.bool() * columns).argmax(-1)
        return x[torch.arange(x.shape[0], device=x.device), idx]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled text features, (B, width); unit vectors when ``cfg.normalize``."""
        input_ids, attention_mask, token_type_ids = self.trim(input_ids, attention_mask, token_type_ids)
        x = self.forward_features(input_ids, attention_mask, token_type_ids)
        x = self.pool(x, input_ids, attention_mask)
        return F.normalize(x, dim=-1) if self.cfg.normalize else x

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], tokenizer: Tokenizer, batch_size: int = 32) -> torch.Tensor:
        """Embed raw texts as ``SentenceTransformer.encode`` does: (N, width) float on the CPU, (width,) for one string.

        Texts are lower-cased if ``cfg.do_lower_case``, truncated to ``cfg.max_seq_length`` tokens
        (default ``context_length``), and run in eval mode, longest first so that a batch pads little.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if self.cfg.do_lower_case:
            texts = [t.lower() for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        length = self.cfg.max_seq_length or self.cfg.context_length
        device = self.token_embed.weight.device
        was_training = self.training
        self.eval()
        try:
            out = torch.empty(len(texts), self.cfg.width)
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = tokenizer([texts[i] for i in rows], context_length=length)
                args = [batch.get(k) for k in ("input_ids", "attention_mask", "token_type_ids")]
                out[rows] = self(*(None if a is None else a.to(device) for a in args)).float().cpu()
        finally:
            self.train(was_training)
        return out[0] if single else out

    def trim(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Drop the columns no pooled output can see: padding past the batch's longest text.

        A batch padded to the full context (OpenAI's tokenizer pads to 77) then costs no
        more than one padded to its longest text. For causal eot pooling, tokens after the
        last end-of-text token are invisible even without an attention mask.
        """
        check_shapes(input_ids, attention_mask)
        if attention_mask is not None:
            # up to the last column holding a real token (right- or left-padded); argmax finds the first maximum
            length = int(attention_mask.any(0).cumsum(0).argmax()) + 1
        elif self.cfg.causal and self.cfg.pool == "eot":
            length = int((input_ids == self.cfg.eot_token_id).int().argmax(-1).max()) + 1
        else:
            return input_ids, attention_mask, token_type_ids
        cut = lambda t: None if t is None else t[:, :length]  # noqa: E731
        return cut(input_ids), cut(attention_mask), cut(token_type_ids)
