"""The text data modules: language modelling (MLM, MLM + NSP, CLM), text and token classification, extractive
question answering.

Shared loading, skipping, stages and the tokenizer: ``mmlm.data.datamodule_base``.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

from torch.utils.data import Dataset

from mmlm.data.collators import (
    CLMCollator,
    MLMCollator,
    QACollator,
    TextClassificationCollator,
    TokenClassificationCollator,
)
from mmlm.data.datamodule_base import BadSamples, BaseDataModule, Stage, TokenizerMixin, stages
from mmlm.data.sources import locate
from mmlm.data.text_datasets import (
    CLMDataset,
    MLMDataset,
    NSPDataset,
    SquadDataset,
    TextClassificationDataset,
    TokenClassificationDataset,
    read_documents,
)
from mmlm.data.transforms import text_config


class _TextDataModule(TokenizerMixin, BaseDataModule):
    def __init__(
        self, tokenizer: str, preset: str | None, max_length: int | None, batch_size: int, num_workers: int,
        drop_last: bool, seed: int, bad_samples: str = "drop",
    ) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers, drop_last, seed, bad_samples)
        self.tokenizer_name = tokenizer
        # the preset's context length, else the tokenizer folder's model_max_length
        self.context_length = max_length or (text_config(preset).context_length if preset else None)

    @property
    def max_length(self) -> int:
        return self.tokenizer.context_length or 512


class LanguageModelingDataModule(_TextDataModule):
    """Text corpora for language pretraining: MLM, MLM + NSP (BERT) or CLM (GPT).

    Args:
        train_data: a corpus: ``.txt`` (one sentence per line, blank line between
            documents) or ``.jsonl`` (one document per row, field ``text_key``).
        val_data: the same kinds.
        tokenizer: a tokenizer folder (e.g. ``assets/tokenizer``) or ``"clip"``.
        objective: ``"mlm"``, ``"mlm_nsp"`` (sentence pairs, 50% random) or ``"clm"``
            (documents packed into full blocks, with per-token document ids).
        preset: model preset whose text tower sets the sequence length.
        max_length: tokens per sequence (CLM: block size); default the preset's
            context length, else the tokenizer's ``model_max_length``.
        mlm_probability: share of tokens to predict (80% [MASK], 10% random, 10% kept).
        text_key: JSONL field with the document text.
        val_fraction: hold out this share of ``train_data``'s documents (its last ones) as validation.
        batch_size: sequences per batch and rank.
        num_workers: DataLoader worker processes.
        drop_last: drop the last partial training batch.
        seed: the training shuffle and NSP pairing.
    """

    def __init__(
        self,
        train_data: str | None = None,
        val_data: str | None = None,
        tokenizer: str = "assets/tokenizer",
        objective: Literal["mlm", "mlm_nsp", "clm"] = "mlm",
        preset: str | None = None,
        max_length: int | None = None,
        mlm_probability: float = 0.15,
        text_key: str = "text",
        val_fraction: float = 0.0,
        batch_size: int = 32,
        num_workers: int = 2,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, preset, max_length, batch_size, num_workers, drop_last, seed)
        self.save_hyperparameters()
        if val_fraction and val_data:
            raise ValueError("give val_data or val_fraction, not both")
        self.sources = {"train": locate(train_data), "val": locate(val_data), "test": None}
        self.val_fraction = val_fraction
        self.objective = objective
        self.mlm_probability = mlm_probability
        self.text_key = text_key

    def _collate(self) -> Callable:
        if self.objective == "clm":
            return CLMCollator(self.tokenizer.pad_token_id)
        return MLMCollator(self.tokenizer, self.mlm_probability, context_length=self.max_length)

    def _documents(self, split: Stage) -> list[str] | None:
        """The split's documents; with ``val_fraction`` the last documents of the training corpus are held out."""
        source = self.sources[split]
        if self.val_fraction and split in ("train", "val"):
            docs = read_documents(self.sources["train"], self.text_key)
            cut = len(docs) - max(1, round(len(docs) * self.val_fraction))
            held_out = docs[cut:]
            if split == "val":
                return held_out
            seen = set(held_out)  # a corpus may repeat a document: keep every copy out of training
            return [d for d in docs[:cut] if d not in seen]
        return None if source is None else read_documents(source, self.text_key)

    def setup(self, stage: str | None = None) -> None:
        for split in stages(stage):
            docs = self._documents(split)
            if docs is None or split in self.datasets:
                continue
            if self.objective == "clm":
                self.datasets[split] = CLMDataset(docs, self.tokenizer, self.max_length)
            elif self.objective == "mlm_nsp":
                self.datasets[split] = NSPDataset(docs, self.tokenizer, self.max_length, self.seed)
            else:
                self.datasets[split] = MLMDataset(docs, self.tokenizer, self.max_length)


class _LabelledTextDataModule(_TextDataModule):
    """Text data with one label set; its names come from ``classes`` or the first data source given."""

    _classes: list[str] | None

    def _dataset(self, split: Stage, classes: list[str] | None) -> Dataset:
        raise NotImplementedError

    @functools.cached_property
    def classes(self) -> list[str]:
        if self._classes is not None:
            return list(self._classes)
        split = next(s for s in ("train", "val", "test") if self.sources[s] is not None)
        return self._dataset(split, None).classes  # type: ignore[attr-defined]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        for split in stages(stage):
            if self.sources[split] is not None and split not in self.datasets:
                self.datasets[split] = self._dataset(split, self.classes)


class TextClassificationDataModule(_LabelledTextDataModule):
    """Texts or text pairs with class labels (sentiment, topic, NLI).

    Args:
        train_data: a CSV / TSV / JSONL file.
        val_data: the same kinds.
        test_data: the same kinds.
        tokenizer: a tokenizer folder or ``"clip"``.
        text_key: column with the text.
        label_key: column with the label (class name or integer).
        text_pair_key: column with the second text of a pair task, if any.
        classes: label names in index order; default: from ``train_data``.
        preset: model preset whose text tower sets the sequence length.
        max_length: token limit; default the preset's, else the tokenizer's.
        batch_size: texts per batch and rank.
        num_workers: DataLoader worker processes.
        bad_samples: training batches: ``"replace"`` a bad sample by another, random
            one (full, equal batches on every rank, which DDP with features gathered
            across ranks needs) or ``"drop"`` it (shorter batches). Validation and test
            always drop, so their metrics cover exactly the good samples.
        drop_last: drop the last partial training batch.
        seed: the training shuffle (a generator of its own, so a resumed run shuffles as an uninterrupted one).
    """

    def __init__(
        self,
        train_data: str | None = None,
        val_data: str | None = None,
        test_data: str | None = None,
        tokenizer: str = "assets/tokenizer",
        text_key: str = "text",
        label_key: str = "label",
        text_pair_key: str | None = None,
        classes: list[str] | None = None,
        preset: str | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        bad_samples: BadSamples = "replace",
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, preset, max_length, batch_size, num_workers, drop_last, seed, bad_samples)
        self.save_hyperparameters()
        self.sources = {"train": locate(train_data), "val": locate(val_data), "test": locate(test_data)}
        self.keys = (text_key, label_key, text_pair_key)
        self._classes = classes

    def _dataset(self, split: Stage, classes: list[str] | None) -> TextClassificationDataset:
        text_key, label_key, pair_key = self.keys
        return TextClassificationDataset(self.sources[split], text_key, label_key, pair_key, classes)  # type: ignore[arg-type]

    def _collate(self) -> Callable:
        return TextClassificationCollator(self.tokenizer, self.max_length)


class TokenClassificationDataModule(_LabelledTextDataModule):
    """CoNLL-format token tagging (NER, POS, chunking).

    Args:
        train_data: a CoNLL file (token first, tag in ``tag_column``, blank line
            between sentences).
        val_data: the same kind.
        test_data: the same kind.
        tokenizer: a tokenizer folder.
        tag_column: column of the tag (default the last).
        classes: tag names in index order; default "O" then the others sorted.
        preset: model preset whose text tower sets the sequence length.
        max_length: token limit; default the preset's, else the tokenizer's.
        batch_size: sentences per batch and rank.
        num_workers: DataLoader worker processes.
        bad_samples: training batches: ``"replace"`` a bad sample by another, random
            one (full, equal batches on every rank, which DDP with features gathered
            across ranks needs) or ``"drop"`` it (shorter batches). Validation and test
            always drop, so their metrics cover exactly the good samples.
        drop_last: drop the last partial training batch.
        seed: the training shuffle (a generator of its own, so a resumed run shuffles as an uninterrupted one).
    """

    def __init__(
        self,
        train_data: str | None = None,
        val_data: str | None = None,
        test_data: str | None = None,
        tokenizer: str = "assets/tokenizer",
        tag_column: int = -1,
        classes: list[str] | None = None,
        preset: str | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        bad_samples: BadSamples = "replace",
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, preset, max_length, batch_size, num_workers, drop_last, seed, bad_samples)
        self.save_hyperparameters()
        self.sources = {"train": locate(train_data), "val": locate(val_data), "test": locate(test_data)}
        self.tag_column = tag_column
        self._classes = classes

    def _dataset(self, split: Stage, classes: list[str] | None) -> TokenClassificationDataset:
        return TokenClassificationDataset(self.sources[split], self.tag_column, classes)  # type: ignore[arg-type]

    def _collate(self) -> Callable:
        return TokenClassificationCollator(self.tokenizer, self.max_length)


class QuestionAnsweringDataModule(_TextDataModule):
    """SQuAD-format extractive QA, as overlapping token windows.

    ``datasets["val"].examples`` (id, context, answers) and
    ``text_datasets.extract_answers`` turn the model's logits back into answers.

    Args:
        train_data: a SQuAD-format JSON file.
        val_data: the same kind.
        test_data: the same kind.
        tokenizer: a tokenizer folder.
        preset: model preset whose text tower sets the window length.
        max_length: tokens per window; default the preset's, else 384.
        doc_stride: tokens shared by consecutive windows of a long context.
        batch_size: windows per batch and rank.
        num_workers: DataLoader worker processes.
        drop_last: drop the last partial training batch.
        seed: the training shuffle (a generator of its own, so a resumed run shuffles as an uninterrupted one).
    """

    def __init__(
        self,
        train_data: str | None = None,
        val_data: str | None = None,
        test_data: str | None = None,
        tokenizer: str = "assets/tokenizer",
        preset: str | None = None,
        max_length: int | None = None,
        doc_stride: int = 128,
        batch_size: int = 32,
        num_workers: int = 2,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, preset, max_length or (None if preset else 384), batch_size, num_workers,
                         drop_last, seed)  # fmt: skip
        self.save_hyperparameters()
        self.sources = {"train": locate(train_data), "val": locate(val_data), "test": locate(test_data)}
        self.doc_stride = doc_stride

    def _collate(self) -> Callable:
        return QACollator(self.tokenizer.pad_token_id)

    def setup(self, stage: str | None = None) -> None:
        for split in stages(stage):
            if self.sources[split] is not None and split not in self.datasets:
                self.datasets[split] = SquadDataset(
                    self.sources[split], self.tokenizer, self.max_length, self.doc_stride
                )  # type: ignore[arg-type]
