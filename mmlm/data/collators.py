"""Collators: samples -> padded batch dicts, padded to the batch's longest sequence.

Every collator first drops the :class:`~mmlm.data.skips.Skip` records a dataset
returned for bad samples and hands them on under ``batch["skipped"]``;
:class:`~mmlm.data.skips.SkippingDataLoader` counts and removes them.

Batch keys (the Lightning tasks rely on them):

- image-text: ``image`` (B,3,H,W), ``input_ids``, ``attention_mask``, ``image_id``
- image classification: ``image``, ``label``
- text classification: ``input_ids``, ``attention_mask``, [``token_type_ids``], ``label``
- MLM: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels`` (-100 = not
  masked); NSP adds ``next_sentence_label`` (0 = B follows A, 1 = B is random)
- CLM: ``input_ids``, ``labels`` (= input_ids, -100 on padding; the model shifts),
  ``attention_mask``, ``document_ids`` (-1 on padding)
- token classification: ``input_ids``, ``attention_mask``, ``labels`` (-100 on
  special tokens and on all but the first sub-word of a word)
- QA: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``start_positions``,
  ``end_positions``, ``offset_mapping`` (-1 outside the context), ``example_index``
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mmlm.data.skips import SKIPPED, split_skips
from mmlm.data.tokenizers import Tokenizer

IGNORE = -100  # label value that losses ignore (torch cross_entropy's ignore_index)


def _start(samples: Sequence[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    good, skips = split_skips(samples)
    return good, {SKIPPED: skips}


def pad_sequences(rows: Sequence[Sequence[int] | torch.Tensor], value: int) -> torch.Tensor:
    """(B, T) LongTensor, T = longest row, right-padded with ``value``."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class ImageTextCollator:
    """Stack images, tokenise captions; extra string fields (e.g. shard ``key``) pass through as lists."""

    def __init__(self, tokenizer: Tokenizer, context_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        good, batch = _start(samples)
        if not good:
            return batch
        batch["image"] = torch.stack([s["image"] for s in good])
        batch.update(self.tokenizer([s["text"] for s in good], context_length=self.context_length))
        batch["image_id"] = torch.tensor([s["image_id"] for s in good], dtype=torch.long)
        for key in good[0].keys() - {"image", "text", "image_id", "label"}:
            batch[key] = [s[key] for s in good]
        if "label" in good[0]:
            batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
        return batch


class ImageClassificationCollator:
    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        good, batch = _start(samples)
        if good:
            batch["image"] = torch.stack([s["image"] for s in good])
            batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
        return batch


class TextClassificationCollator:
    """Tokenise ``text`` (and ``text_pair`` when present), stack ``label``."""

    def __init__(self, tokenizer: Tokenizer, context_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        good, batch = _start(samples)
        if not good:
            return batch
        pair = [s["text_pair"] for s in good] if "text_pair" in good[0] else None
        batch.update(self.tokenizer([s["text"] for s in good], pair, context_length=self.context_length))
        batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
        return batch


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    mask_token_id: int,
    replacement_ids: torch.Tensor,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``probability`` of the non-special tokens; of those, 80% -> [MASK],
    10% -> a random non-special token, 10% unchanged.

    The counts are exact per batch (a random subset of round(p * N) positions, split
    80/10/10 by count) rather than one coin per token as in HF's collator: the same
    expected rates with less noise, and never a batch with nothing to predict.

    Returns (masked input_ids, labels with -100 where nothing is predicted).
    """
    eligible = (~special).nonzero()  # (N, 2) positions that may be masked
    n = eligible.shape[0]
    labels = torch.full_like(input_ids, IGNORE)
    if n == 0:
        return input_ids.clone(), labels
    k = max(1, round(n * probability))
    chosen = eligible[torch.randperm(n, generator=generator)[:k]]
    rows, cols = chosen[:, 0], chosen[:, 1]
    labels[rows, cols] = input_ids[rows, cols]
    out = input_ids.clone()
    n_mask = round(k * mask_fraction)
    n_random = round(k * random_fraction)
    out[rows[:n_mask], cols[:n_mask]] = mask_token_id
    pick = torch.randint(len(replacement_ids), (n_random,), generator=generator)
    r = slice(n_mask, n_mask + n_random)
    out[rows[r], cols[r]] = replacement_ids[pick]
    return out, labels


class MLMCollator:
    """Tokenise ``text`` (+ ``text_pair``) and mask for MLM; passes ``next_sentence_label`` on (NSP)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        context_length: int | None = None,
    ) -> None:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"MLM needs a tokenizer with a mask token; {tokenizer} has none")
        self.tokenizer = tokenizer
        self.probability = probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.context_length = context_length
        special = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        special[tokenizer.all_special_ids] = True
        self.replacement_ids = (~special).nonzero().squeeze(1)

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        good, batch = _start(samples)
        if not good:
            return batch
        pair = [s["text_pair"] for s in good] if "text_pair" in good[0] else None
        enc = self.tokenizer([s["text"] for s in good], pair, context_length=self.context_length,
                             return_special_tokens_mask=True)  # fmt: skip
        special = enc.pop("special_tokens_mask").bool() | (enc["attention_mask"] == 0)
        enc["input_ids"], enc["labels"] = mask_tokens(
            enc["input_ids"], special, self.tokenizer.mask_token_id, self.replacement_ids,
            self.probability, self.mask_fraction, self.random_fraction,
        )  # fmt: skip
        enc.setdefault("token_type_ids", torch.zeros_like(enc["input_ids"]))
        batch.update(enc)
        if "next_sentence_label" in good[0]:
            batch["next_sentence_label"] = torch.tensor([s["next_sentence_label"] for s in good], dtype=torch.long)
        return batch


class CLMCollator:
    """Pad packed blocks (from ``CLMDataset``); labels are the inputs, the model shifts them."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        good, batch = _start(samples)
        if not good:
            return batch
        input_ids = pad_sequences([s["input_ids"] for s in good], self.pad_token_id)
        attention_mask = pad_sequences([[1] * len(s["input_ids"]) for s in good], 0)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                     document_ids=pad_sequences([s["document_ids"] for s in good], -1))  # fmt: skip
        return batch


def document_attention_mask(document_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(B, 1, T, T) boolean mask, True = attend: same document (and not ahead, if causal).

    Padding (document id -1) attends only to itself, so no row is fully masked
    (an all-False row gives NaN in scaled_dot_product_attention).
    """
    d = document_ids
    same = d[:, :, None] == d[:, None, :]  # (B, T, T)
    if causal:
        T = d.shape[1]
        same &= torch.ones(T, T, dtype=torch.bool, device=d.device).tril()
    pad = d < 0
    same &= ~pad[:, None, :] | torch.eye(d.shape[1], dtype=torch.bool, device=d.device)
    return same[:, None]


class TokenClassificationCollator:
    """Tokenise pre-split ``words``; each word's tag goes on its first sub-word only."""

    def __init__(self, tokenizer: Tokenizer, context_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        good, batch = _start(samples)
        if not good:
            return batch
        encodings = self.tokenizer.encode_batch([s["words"] for s in good], context_length=self.context_length,
                                                is_pretokenized=True)  # fmt: skip
        labels = []
        for enc, s in zip(encodings, good):
            row, previous = [], None
            for w in enc.word_ids:
                row.append(IGNORE if w is None or w == previous else s["tags"][w])
                previous = w
            labels.append(row)
        batch.update(self.tokenizer.pad(encodings, token_types=self.tokenizer.has_token_types))
        batch["labels"] = pad_sequences(labels, IGNORE)
        return batch


class QACollator:
    """Pad pre-tokenised QA windows (from ``SquadDataset``)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        good, batch = _start(samples)
        if not good:
            return batch
        batch["input_ids"] = pad_sequences([s["input_ids"] for s in good], self.pad_token_id)
        batch["attention_mask"] = pad_sequences([[1] * len(s["input_ids"]) for s in good], 0)
        batch["token_type_ids"] = pad_sequences([s["token_type_ids"] for s in good], 0)
        length = batch["input_ids"].shape[1]
        offsets = torch.full((len(good), length, 2), -1, dtype=torch.long)
        for i, s in enumerate(good):
            offsets[i, : len(s["offset_mapping"])] = torch.as_tensor(s["offset_mapping"], dtype=torch.long)
        batch["offset_mapping"] = offsets
        for key in ("start_positions", "end_positions", "example_index"):
            batch[key] = torch.tensor([s[key] for s in good], dtype=torch.long)
        return batch
