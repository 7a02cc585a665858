"""LightningDataModules, one per task, configured from YAML through LightningCLI.

Image sizes, interpolation and mean/std come from the model preset
(``mmlm.config.from_name(preset)``; a CLIP preset's ``.vision`` / ``.text``), so a
YAML file names the preset once and data and model agree. Every loader is a
``SkippingDataLoader``: bad samples are skipped, counted per reason in
``datamodule.skip_stats[stage]`` and reported at the end of each epoch. In
training a bad sample's slot is refilled by default (``bad_samples="replace"``)
so that every rank gets full, equal batches; validation and test drop it.

Attributes the CLI can link into the model after instantiation
(``link_arguments(..., apply_on="instantiate")``): ``vocab_size``,
``pad_token_id``, ``num_classes``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import lightning as L
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader.sampler import RandomSampler

from mmlm.data.collators import (
    CLMCollator,
    ImageClassificationCollator,
    ImageTextCollator,
    MLMCollator,
    QACollator,
    TextClassificationCollator,
    TokenClassificationCollator,
)
from mmlm.data.digits import digits_image_text
from mmlm.data.image_datasets import ImageClassificationDataset, ImageTextDataset
from mmlm.data.skips import ReplaceBad, SkippingDataLoader, SkipStats
from mmlm.data.sources import find_shards, is_digits, locate, prompts
from mmlm.data.text_datasets import (
    CLMDataset,
    MLMDataset,
    NSPDataset,
    SquadDataset,
    TextClassificationDataset,
    TokenClassificationDataset,
    read_documents,
)
from mmlm.data.tokenizers import Tokenizer, get_tokenizer
from mmlm.data.transforms import image_transform, text_config
from mmlm.data.webdataset import ImageTextShards

Stage = Literal["train", "val", "test"]
BadSamples = Literal["drop", "replace"]


def _passthrough(batch: Any) -> Any:
    return batch


class _DataModule(L.LightningDataModule):
    """Loaders and skip statistics shared by all the task data modules."""

    def __init__(
        self, batch_size: int, num_workers: int, drop_last: bool, seed: int, bad_samples: str = "drop"
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be 1 or more, got {batch_size}")
        self.bad_samples = bad_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}
        self.skip_stats: dict[str, SkipStats] = {}

    def _stats(self, stage: Stage) -> SkipStats:
        return self.skip_stats.setdefault(stage, SkipStats(name=f"{type(self).__name__}[{stage}]"))

    def _loader(self, stage: Stage, collate: Callable) -> SkippingDataLoader | list:
        if stage not in self.datasets:
            if getattr(self, "sources", {}).get(stage) is None:
                return []  # Lightning's "no loader for this stage" (e.g. a model with validation_step, no val_data)
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for the {stage} loader")
        ds = self.datasets[stage]
        if isinstance(ds, ImageTextShards):  # batches are built inside the workers
            return SkippingDataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough,
                                      stats=self._stats(stage))  # fmt: skip
        train = stage == "train"
        if train and self.bad_samples == "replace":
            ds = ReplaceBad(ds)
        # Shuffling and the workers' base seed draw from generators of their own, never from the
        # global RNG: the augmentations use that one, RestoreRNG restores it, and a loader made or
        # iterated anew on resume then leaves it as the uninterrupted run found it.
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(self.seed)) if train else None
        return SkippingDataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, drop_last=train and self.drop_last,
            num_workers=self.num_workers, collate_fn=collate, stats=self._stats(stage),
            generator=torch.Generator().manual_seed(self.seed + 1),
        )  # fmt: skip

    def _rank_world(self) -> tuple[int | None, int | None]:
        """The trainer's rank and world size; None outside a Trainer (then torchrun's env decides)."""
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (None, None)

    def _collate(self) -> Callable:
        raise NotImplementedError

    def train_dataloader(self) -> SkippingDataLoader | list:
        return self._loader("train", self._collate())

    def val_dataloader(self) -> SkippingDataLoader | list:
        return self._loader("val", self._collate())

    def test_dataloader(self) -> SkippingDataLoader | list:
        return self._loader("test", self._collate())

    def predict_dataloader(self) -> SkippingDataLoader | list:
        return self._loader("test", self._collate())  # mmlm predict runs on test_data


def _stages(stage: str | None) -> tuple[Stage, ...]:
    return {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(
        stage or "", ("train", "val", "test")
    )


class _TokenizerMixin:
    tokenizer_name: str
    context_length: int | None

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return get_tokenizer(self.tokenizer_name, self.context_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id


# ----------------------------------------------------------------------------- images


class ImageTextDataModule(_TokenizerMixin, _DataModule):
    """Image-caption pairs for contrastive alignment (CLIP / SigLIP) and retrieval.

    Args:
        train_data: a CSV / TSV / JSONL manifest, WebDataset shards
            (``data/{000..099}.tar`` or a folder of them), or ``"digits"`` (see ``mmlm.data.sources``).
        val_data: the same kinds; read once per epoch in order. Labelled images (``label_key``,
            a shard's ``cls``, the digits) add zero-shot accuracy to the validation metrics.
        test_data: the same kinds.
        preset: model preset whose image tower sets size, interpolation and
            mean/std, and whose text tower sets the context length.
        tokenizer: ``"clip"``, a CLIP preset name, or a tokenizer folder.
        context_length: token limit; default the preset's text context length.
        batch_size: samples per batch and rank.
        num_workers: DataLoader worker processes.
        image_key: manifest column with the image path (relative to the manifest).
        caption_key: manifest column with the caption (JSONL: a string or a list).
        json_caption_key: field of a shard's ``.json`` member with the caption(s).
        label_key: manifest column with a class label (name or integer) for zero-shot validation.
        classnames: class names in label order for zero-shot validation; default: the
            source's own (the digits, a shard folder's ``classnames.txt``).
        templates: prompt templates (``str.format`` with one class name); default: the source's
            own, else ``"a photo of a {}."``.
        captions: manifest items: every (image, caption) pair, or one random
            caption per image and epoch.
        resampled: shards drawn with replacement (needs ``epoch_length``).
        epoch_length: training samples per epoch over all ranks, for shards; with
            it every rank yields the same number of batches (no DDP hang).
        shuffle_buffer: in-worker shuffle buffer for shards.
        crop_scale: area range of the training random resized crop.
        hflip: training flip probability; 0 by default since captions say
            "left" and "right" (open_clip does not flip either).
        bad_samples: training batches: ``"replace"`` a bad sample by another, random
            one (full, equal batches on every rank, which DDP with features gathered
            across ranks needs) or ``"drop"`` it (shorter batches). Validation and test
            always drop, so their metrics cover exactly the good samples.
        drop_last: drop the last partial training batch (equal shapes on all ranks).
        seed: the training shuffle, shard order and caption choice.
    """

    def __init__(
        self,
        train_data: str | None = None,
        val_data: str | None = None,
        test_data: str | None = None,
        preset: str = "clip-vit-b-32",
        tokenizer: str = "clip",
        context_length: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        image_key: str = "filepath",
        caption_key: str = "title",
        json_caption_key: str = "caption",
        label_key: str | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        captions: Literal["all", "random"] = "all",
        resampled: bool = False,
        epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        hflip: float = 0.0,
        bad_samples: BadSamples = "replace",
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, drop_last, seed, bad_samples)
        self.save_hyperparameters()
        self.sources = {"train": locate(train_data), "val": locate(val_data), "test": locate(test_data)}
        self.preset = preset
        self.tokenizer_name = tokenizer
        self.context_length = context_length or text_config(preset).context_length
        self._label_names: list[str] | None = None  # the validation manifest's classes (label_key)

    def _collate(self) -> Callable:
        return ImageTextCollator(self.tokenizer, self.context_length)

    @functools.cached_property
    def _source_prompts(self) -> tuple[list[str] | None, list[str] | None]:
        return prompts(self.sources["val"], "test") if self.sources["val"] is not None else (None, None)

    @property
    def classnames(self) -> list[str] | None:
        """Class names (label order) for zero-shot validation, when the validation images have labels."""
        return self.hparams.classnames or self._source_prompts[0] or self._label_names

    @property
    def templates(self) -> list[str] | None:
        """Prompt templates (``str.format`` with one class name) matching ``classnames``."""
        if not self.classnames:
            return None
        return self.hparams.templates or self._source_prompts[1] or ["a photo of a {}."]

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        rank, world = self._rank_world()
        for split in _stages(stage):
            source = self.sources[split]
            if source is None or split in self.datasets:
                continue
            train = split == "train"
            transform = image_transform(self.preset, train, scale=tuple(hp.crop_scale), hflip=hp.hflip)
            shards = None if is_digits(source) else find_shards(source, "train" if train else "test")
            if is_digits(source):
                self.datasets[split] = digits_image_text("train" if train else "test", hp.seed, transform=transform)
            elif shards is not None:
                self.datasets[split] = ImageTextShards(
                    shards[0], self._collate(), self.batch_size, transform,
                    resampled=hp.resampled and train, epoch_length=hp.epoch_length if train else None,
                    shuffle=train, shuffle_buffer=hp.shuffle_buffer, caption_key=hp.json_caption_key,
                    seed=hp.seed, rank=rank, world_size=world, num_workers=self.num_workers,
                    drop_last=train and self.drop_last,
                )  # fmt: skip
            else:
                ds = ImageTextDataset(
                    source, hp.image_key, hp.caption_key, transform, captions=hp.captions if train else "all",
                    label_key=hp.label_key, classes=hp.classnames,
                )  # fmt: skip
                if split == "val" and hp.label_key:
                    self._label_names = ds.classes
                self.datasets[split] = ds


class ImageClassificationDataModule(_DataModule):
    """Images with class labels, for fine-tuning and linear probes.

    Args:
        train_data: an ImageFolder tree (``root/class_name/image.jpg``), a CSV /
            TSV / JSONL manifest, or ``"digits"``.
        val_data: the same kinds.
        test_data: the same kinds.
        preset: model preset whose image tower sets size, interpolation and mean/std.
        batch_size: samples per batch and rank.
        num_workers: DataLoader worker processes.
        image_key: manifest column with the image path (relative to the manifest).
        label_key: manifest column with the label (class name or integer).
        classes: class names in label order; default: from ``train_data``.
        crop_scale: area range of the training random resized crop (ImageNet recipe).
        hflip: training flip probability.
        bad_samples: training batches: ``"replace"`` a bad sample by another, random
            one (full, equal batches on every rank, which DDP with features gathered
            across ranks needs) or ``"drop"`` it (shorter batches). Validation and test
            always drop, so their metrics cover exactly the good samples.
        drop_last: drop the last partial training batch.
        seed: the training shuffle and the digits split.
    """

    def __init__(
        self,
        train_data: str | None = None,
        val_data: str | None = None,
        test_data: str | None = None,
        preset: str = "vit-b-16",
        batch_size: int = 64,
        num_workers: int = 4,
        image_key: str = "filepath",
        label_key: str = "label",
        classes: list[str] | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        bad_samples: BadSamples = "replace",
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, drop_last, seed, bad_samples)
        self.save_hyperparameters()
        self.sources = {"train": locate(train_data), "val": locate(val_data), "test": locate(test_data)}
        self.preset = preset
        self._classes = classes

    def _dataset(self, split: Stage, transform: Callable | None) -> Dataset:
        source = self.sources[split]
        assert source is not None
        if is_digits(source):
            return digits_image_text("train" if split == "train" else "test", self.hparams.seed, transform=transform)
        return ImageClassificationDataset(
            source, transform, self.hparams.image_key, self.hparams.label_key, self._classes
        )

    @functools.cached_property
    def classes(self) -> list[str]:
        """Class names in label order (read from the first data source given)."""
        if self._classes is not None:
            return list(self._classes)
        split = next(s for s in ("train", "val", "test") if self.sources[s] is not None)
        return list(self._dataset(split, None).classes)  # type: ignore[attr-defined]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _collate(self) -> Callable:
        return ImageClassificationCollator()

    def setup(self, stage: str | None = None) -> None:
        self._classes = self.classes  # every split uses the training label order
        for split in _stages(stage):
            if self.sources[split] is not None and split not in self.datasets:
                train = split == "train"
                transform = image_transform(
                    self.preset, train, scale=tuple(self.hparams.crop_scale), hflip=self.hparams.hflip
                )
                self.datasets[split] = self._dataset(split, transform)


# ----------------------------------------------------------------------------- text


class _TextDataModule(_TokenizerMixin, _DataModule):
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
        for split in _stages(stage):
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
        for split in _stages(stage):
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
        for split in _stages(stage):
            if self.sources[split] is not None and split not in self.datasets:
                self.datasets[split] = SquadDataset(
                    self.sources[split], self.tokenizer, self.max_length, self.doc_stride
                )  # type: ignore[arg-type]
