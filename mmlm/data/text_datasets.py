"""Text datasets: corpora for MLM / NSP / CLM, text and token classification, extractive QA.

Corpus format (BERT's pretraining format): plain text with one sentence per line
and a blank line between documents; or JSONL with one document per row. A
document written on a single line is split into sentences at ``. ! ?``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmlm.data.manifest import label_indices, read_manifest, require_columns
from mmlm.data.skips import BAD_LABEL, Skip, check_text
from mmlm.data.tokenizers import Tokenizer

log = logging.getLogger("mmlm.data")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split one line of prose after ``. ! ?`` followed by a capital or a digit."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if s]


def read_documents(path: str | Path, text_key: str = "text") -> list[str]:
    """Documents of a corpus: blank-line-separated blocks of a .txt, or ``text_key`` of each JSONL row."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = read_manifest(path)
        docs = [r.get(text_key) for r in rows]
        good = [d.strip() for d in docs if isinstance(d, str) and d.strip()]
        if len(good) < len(docs):
            log.warning("%s: %d rows without text in %r dropped", path, len(docs) - len(good), text_key)
    else:
        good = [
            d.strip() for d in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")) if d.strip()
        ]
    if not good:
        raise ValueError(f"corpus {path} has no documents")
    return good


def document_sentences(doc: str) -> list[str]:
    lines = [line.strip() for line in doc.splitlines() if line.strip()]
    return split_sentences(lines[0]) if len(lines) == 1 else lines


class _Corpus:
    """Sentences per document with their token counts (counted once, up front)."""

    def __init__(self, documents: Sequence[str], tokenizer: Tokenizer) -> None:
        self.sentences = [document_sentences(d) for d in documents]
        flat = [s for doc in self.sentences for s in doc]
        counts = [len(e.ids) for e in tokenizer.encode_batch(flat, add_special_tokens=False, truncate=False)]
        self.lengths: list[list[int]] = []
        i = 0
        for doc in self.sentences:
            self.lengths.append(counts[i : i + len(doc)])
            i += len(doc)
        self.n_special_single = len(tokenizer.encode(""))
        self.n_special_pair = len(tokenizer.encode("", ""))

    def take(self, doc: int, start: int, budget: int, stop: int | None = None) -> tuple[list[str], int]:
        """Sentences doc[start:] (before ``stop``) while they fit ``budget`` tokens; at least one."""
        stop = len(self.sentences[doc]) if stop is None else stop
        out, used = [], 0
        for j in range(start, stop):
            n = self.lengths[doc][j]
            if out and used + n > budget:
                break
            out.append(self.sentences[doc][j])
            used += n
        return out, used


class MLMDataset(Dataset):
    """Chunks of consecutive sentences of one document, each up to ``max_length`` tokens.

    Items are ``{"text": str}``; ``MLMCollator`` tokenises and masks them.
    """

    def __init__(self, documents: Sequence[str], tokenizer: Tokenizer, max_length: int = 128) -> None:
        corpus = _Corpus(documents, tokenizer)
        budget = max_length - corpus.n_special_single
        self.chunks: list[str] = []
        for d, sents in enumerate(corpus.sentences):
            j = 0
            while j < len(sents):
                taken, _ = corpus.take(d, j, budget)
                self.chunks.append(" ".join(taken))
                j += len(taken)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"text": self.chunks[idx]}


class NSPDataset(Dataset):
    """Sentence pairs for next-sentence prediction (+ MLM through ``MLMCollator``).

    One item per sentence that has a successor in its document: A is a run of
    sentences starting there (about half the token budget); B is the run that
    follows it (``next_sentence_label`` 0) or a run from a different, random
    document (label 1). Exactly half the items of an epoch are random (a seeded
    permutation decides which), so the classes are balanced by construction.
    """

    def __init__(self, documents: Sequence[str], tokenizer: Tokenizer, max_length: int = 128, seed: int = 0) -> None:
        self.corpus = _Corpus(documents, tokenizer)
        if len(self.corpus.sentences) < 2:
            raise ValueError("NSP needs at least two documents (random B comes from another one)")
        self.budget = max_length - self.corpus.n_special_pair
        self.starts = [(d, j) for d, sents in enumerate(self.corpus.sentences) for j in range(len(sents) - 1)]
        if not self.starts:
            raise ValueError("NSP needs documents with at least two sentences")
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self._is_random = rng.permutation(len(self.starts)) % 2

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        c = self.corpus
        rng = random.Random(f"{self.seed}-{self.epoch}-{idx}")
        doc, start = self.starts[idx]
        n = len(c.sentences[doc])
        # A leaves at least one sentence after it, for the true continuation
        a, used = c.take(doc, start, self.budget // 2, stop=n - 1)
        label = int(self._is_random[idx])
        if label == 0:
            b, _ = c.take(doc, start + len(a), self.budget - used)
        else:
            other = rng.randrange(len(c.sentences) - 1)
            other += other >= doc  # any document but this one
            b, _ = c.take(other, rng.randrange(len(c.sentences[other])), self.budget - used)
        return {"text": " ".join(a), "text_pair": " ".join(b), "next_sentence_label": label}


class CLMDataset(Dataset):
    """Documents packed into blocks of ``block_size`` tokens, each document ending in end-of-text.

    Packing wastes no compute on padding; ``document_ids`` (0, 1, ... within a
    block) let the model block attention across documents
    (``collators.document_attention_mask``).
    """

    def __init__(
        self, documents: Sequence[str], tokenizer: Tokenizer, block_size: int = 128, drop_last: bool = False
    ) -> None:
        eot = tokenizer.eot_token_id
        if eot is None:
            raise ValueError("CLM packing needs a tokenizer with an end-of-text token")
        encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False, truncate=False)
        ids = [np.append(np.asarray(e.ids, dtype=np.int64), eot) for e in encodings]
        self.tokens = np.concatenate(ids)
        self.doc_of_token = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
        self.block_size = block_size
        n = len(self.tokens) / block_size
        self.n_blocks = math.floor(n) if drop_last else math.ceil(n)

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sl = slice(idx * self.block_size, (idx + 1) * self.block_size)
        docs = self.doc_of_token[sl]
        return {"input_ids": torch.from_numpy(self.tokens[sl]), "document_ids": torch.from_numpy(docs - docs[0])}


class TextClassificationDataset(Dataset):
    """Texts (or text pairs) with a class label from a CSV / TSV / JSONL file.

    Args:
        path: the file.
        text_key / label_key: its columns; ``text_pair_key`` for pair tasks (NLI).
        classes: label names in index order; default: sorted distinct labels
            (integer labels 0..max are used as given).
    """

    def __init__(
        self,
        path: str | Path,
        text_key: str = "text",
        label_key: str = "label",
        text_pair_key: str | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        rows = read_manifest(path)
        require_columns(rows, [text_key, label_key] + ([text_pair_key] if text_pair_key else []), path)
        self.classes, self.labels = label_indices([r.get(label_key) for r in rows], classes)
        self.rows = rows
        self.path, self.text_key, self.text_pair_key = str(path), text_key, text_pair_key

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, Any] | Skip:
        name = f"{self.path} row {idx}"
        text = check_text(self.rows[idx].get(self.text_key), name)
        if isinstance(text, Skip):
            return text
        if self.labels[idx] is None:
            return Skip(BAD_LABEL, name, f"label {self.rows[idx]!r:.60}")
        item = {"text": text, "label": self.labels[idx]}
        if self.text_pair_key:
            pair = check_text(self.rows[idx].get(self.text_pair_key), name)
            if isinstance(pair, Skip):
                return pair
            item["text_pair"] = pair
        return item


def read_conll(path: str | Path, tag_column: int = -1) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence of a CoNLL file: token first, tag in ``tag_column``, blank lines between."""
    sentences, words, tags = [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        words.append(cols[0])
        tags.append(cols[tag_column])
    if words:
        sentences.append((words, tags))
    return sentences


class TokenClassificationDataset(Dataset):
    """Sentences of a CoNLL file (NER, POS, chunking): ``{"words": [...], "tags": [int, ...]}``.

    ``classes`` defaults to "O" (when present) followed by the other tags sorted.
    """

    def __init__(self, path: str | Path, tag_column: int = -1, classes: Sequence[str] | None = None) -> None:
        self.sentences = read_conll(path, tag_column)
        if not self.sentences:
            raise ValueError(f"no sentences in {path}")
        if classes is None:
            tags = {t for _, ts in self.sentences for t in ts}
            classes = (["O"] if "O" in tags else []) + sorted(tags - {"O"})
        self.classes = list(classes)
        self._index = {c: i for i, c in enumerate(self.classes)}
        self.path = str(path)

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, idx: int) -> dict[str, Any] | Skip:
        words, tags = self.sentences[idx]
        unknown = [t for t in tags if t not in self._index]
        if unknown:
            return Skip(BAD_LABEL, f"{self.path} sentence {idx}", f"tags {unknown[:3]}")
        return {"words": words, "tags": [self._index[t] for t in tags]}


class SquadDataset(Dataset):
    """SQuAD-format extractive QA, as token windows over each context.

    A context longer than ``max_length`` becomes several windows overlapping by
    ``doc_stride`` tokens (the question repeated in each). A window that does not
    hold the whole answer, or an unanswerable question (SQuAD 2), points
    start/end at token 0. ``examples`` keeps id, context and answers, and
    ``extract_answers`` maps model logits back to answer text.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, max_length: int = 384, doc_stride: int = 128) -> None:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        self.examples: list[dict[str, Any]] = [
            {"id": qa["id"], "question": qa["question"].strip(), "context": para["context"],
             "answers": [] if qa.get("is_impossible") else qa.get("answers", [])}
            for article in data for para in article["paragraphs"] for qa in para["qas"]
        ]  # fmt: skip
        if not self.examples:
            raise ValueError(f"no questions in {path}")
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(tokenizer.backend.to_str())
        backend.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
        encodings = backend.encode_batch([(e["question"], e["context"]) for e in self.examples])
        self.features: list[dict[str, Any]] = []
        for i, (ex, enc) in enumerate(zip(self.examples, encodings)):
            for window in [enc, *enc.overflowing]:
                self.features.append(self._feature(i, ex, window))

    @staticmethod
    def _feature(index: int, ex: dict[str, Any], enc: Any) -> dict[str, Any]:
        seq = enc.sequence_ids
        offsets = [o if s == 1 else (-1, -1) for o, s in zip(enc.offsets, seq)]
        context = [t for t, s in enumerate(seq) if s == 1]
        start = end = 0
        if ex["answers"] and context:
            a = ex["answers"][0]
            s_char = a["answer_start"]
            e_char = s_char + len(a["text"])
            if offsets[context[0]][0] <= s_char and offsets[context[-1]][1] >= e_char:
                start = next(t for t in context if offsets[t][1] > s_char)
                end = max(t for t in context if offsets[t][0] < e_char)
        return {"input_ids": enc.ids, "token_type_ids": enc.type_ids, "offset_mapping": offsets,
                "start_positions": start, "end_positions": end, "example_index": index}  # fmt: skip

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.features[idx]


# example index -> (start + end logit of its best span, that span's text)
Answers = dict[int, tuple[float, str]]


def merge_answers(best: Answers, candidates: Iterable[tuple[int, float, str]]) -> Answers:
    """Keep, per example, the highest-scoring of ``best`` and the (example, score, text) candidates; updates ``best``."""
    for ex, score, text in candidates:
        if ex not in best or score > best[ex][0]:
            best[ex] = (score, text)
    return best


def extract_answers(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    offset_mapping: torch.Tensor,
    example_index: torch.Tensor,
    contexts: Sequence[str],
    max_answer_length: int = 30,
    best: Answers | None = None,
) -> Answers:
    """Best answer per example over all its windows: max start + end logit, start <= end.

    Args are the batch's ``offset_mapping`` / ``example_index`` and the model's
    (B, T) logits; ``contexts[example_index]`` is the example's context. An example's
    windows may fall in several batches: pass the previous result as ``best`` and the
    windows of this batch compete with those seen before (``best`` is updated and returned).
    """
    candidates = []
    valid = offset_mapping[..., 0] >= 0  # (B, T) context tokens only
    T = start_logits.shape[1]
    band = torch.ones(T, T, dtype=torch.bool, device=start_logits.device).triu().tril(max_answer_length - 1)
    for b in range(start_logits.shape[0]):
        s = start_logits[b].float().masked_fill(~valid[b], -math.inf)
        e = end_logits[b].float().masked_fill(~valid[b], -math.inf)
        scores = (s[:, None] + e[None, :]).masked_fill(~band, -math.inf)  # (T, T): start x end
        flat = int(scores.argmax())
        score = float(scores.flatten()[flat])
        if score == -math.inf:
            continue
        i, j = divmod(flat, T)
        ex = int(example_index[b])
        candidates.append((ex, score, contexts[ex][int(offset_mapping[b, i, 0]) : int(offset_mapping[b, j, 1])]))
    return merge_answers({} if best is None else best, candidates)
