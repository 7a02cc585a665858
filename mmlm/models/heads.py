"""Task heads on top of ``TextEncoder.forward_features``, and a model that carries them.

Heads stay thin: each reads the encoder's token states (or the pooled [CLS] vector)
and nothing else. Tied output layers (BERT's MLM decoder, GPT-2's LM head) take the
word-embedding matrix as an argument and use it through ``F.linear`` instead of
holding a second Parameter pointing at it: the state dict then has each tensor once,
which safetensors requires (it refuses tensors that share memory).

    input_ids -> encoder.forward_features -> (B, T, W) -+-> mlm  -> (B, T, vocab)   tied + bias
                                                        +-> clm  -> (B, T, vocab)   tied
                                                        +-> x[:, 0] -> pooler -> (B, W) -+-> nsp -> (B, 2)
                                                        |                                +-> classifier -> logits
                                                        +-> encoder.pool -> classifier -> (B, labels)   (no pooler)
                                                        +-> token_classifier -> (B, T, labels)          logits
                                                        +-> qa -> (B, T, 2)      start_logits, end_logits
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmlm.config import TextConfig, TextWithHeadsConfig
from mmlm.layers import ACTIVATIONS
from mmlm.models.init import init_weights
from mmlm.models.text import TextEncoder


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first ([CLS]) token; what NSP and BERT classifiers read."""

    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, W)


class MLMHead(nn.Module):
    """Masked-LM head: dense + activation + LayerNorm, then the tied word embeddings and a bias."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.act = ACTIVATIONS[cfg.act]()
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """(B, T, W) states, (vocab, W) embedding matrix -> (B, T, vocab) logits."""
        return F.linear(self.norm(self.act(self.dense(x))), embedding, self.bias)


class CLMHead(nn.Module):
    """Causal-LM head of GPT-2: the tied word embeddings, no bias, no parameters of its own."""

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(x, embedding)  # (B, T, vocab)


class NSPHead(nn.Module):
    """Next-sentence prediction: a 2-way linear on the pooler output (0 = is next, 1 = random)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)  # (B, 2)


class TextWithHeads(nn.Module):
    """A ``TextEncoder`` (``encoder``) and the heads named in ``cfg.heads``, saved and loaded as one model.

    ``forward`` returns a dict: ``hidden_states`` always, and ``pooled``, ``mlm_logits``,
    ``nsp_logits``, ``clm_logits`` for the heads present; the fine-tuning heads are named as
    transformers names them: ``logits`` (B, num_labels) from ``classifier`` or (B, T, num_labels)
    from ``token_classifier``, ``start_logits`` / ``end_logits`` (B, T) from ``qa``.
    The fine-tuning heads are plain ``nn.Linear``s. ``classifier`` reads BERT's pooler output when
    the model has a ``pooler`` (as transformers' ``BertForSequenceClassification`` does), else the
    encoder's own pooling (``TextConfig.pool``: GPT-2's last token, CLIP's end-of-text token).
    """

    def __init__(self, cfg: TextWithHeadsConfig):
        super().__init__()
        self.cfg = cfg
        heads = set(cfg.heads)
        self.encoder = TextEncoder(cfg.text)
        self.pooler = Pooler(cfg.text.width) if "pooler" in heads else None
        self.mlm = MLMHead(cfg.text) if "mlm" in heads else None
        self.nsp = NSPHead(cfg.text.width) if "nsp" in heads else None
        self.clm = CLMHead() if "clm" in heads else None
        labelled = heads & {"classifier", "token_classifier"}
        self.dropout = nn.Dropout(cfg.classifier_dropout) if labelled else None
        self.classifier = nn.Linear(cfg.text.width, cfg.num_labels) if "classifier" in heads else None
        self.token_classifier = nn.Linear(cfg.text.width, cfg.num_labels) if "token_classifier" in heads else None
        self.qa = nn.Linear(cfg.text.width, 2) if "qa" in heads else None
        for head in self.children():  # every head by the encoder's family; the encoder initialised itself
            if head is not self.encoder:
                init_weights(head, cfg.text, "text")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's blocks in the backward pass instead of storing their activations."""
        self.encoder.set_grad_checkpointing(enable)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        x = self.encoder.forward_features(input_ids, attention_mask, token_type_ids)  # (B, T, W)
        out = {"hidden_states": x}
        embedding = self.encoder.token_embed.weight
        if self.pooler is not None:
            out["pooled"] = self.pooler(x)
        if self.nsp is not None:
            out["nsp_logits"] = self.nsp(out["pooled"])
        if self.mlm is not None:
            out["mlm_logits"] = self.mlm(x, embedding)
        if self.clm is not None:
            out["clm_logits"] = self.clm(x, embedding)
        if self.classifier is not None:
            pooled = out["pooled"] if self.pooler is not None else self.encoder.pool(x, input_ids, attention_mask)
            out["logits"] = self.classifier(self.dropout(pooled))
        if self.token_classifier is not None:
            out["logits"] = self.token_classifier(self.dropout(x))
        if self.qa is not None:
            out["start_logits"], out["end_logits"] = self.qa(x).unbind(-1)
        return out
