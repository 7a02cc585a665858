"""The image data modules: image-caption pairs (contrastive alignment, retrieval) and image classification.

Shared loading, skipping and stages: ``mmlm.data.datamodule_base``.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

from torch.utils.data import Dataset

from mmlm.data.collators import ImageClassificationCollator, ImageTextCollator
from mmlm.data.datamodule_base import BadSamples, BaseDataModule, Stage, TokenizerMixin, stages
from mmlm.data.digits import digits_image_text
from mmlm.data.image_datasets import ImageClassificationDataset, ImageTextDataset
from mmlm.data.sources import find_shards, is_digits, locate, prompts
from mmlm.data.transforms import image_transform, text_config
from mmlm.data.webdataset import ImageTextShards


class ImageTextDataModule(TokenizerMixin, BaseDataModule):
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
        for split in stages(stage):
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


class ImageClassificationDataModule(BaseDataModule):
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
        for split in stages(stage):
            if self.sources[split] is not None and split not in self.datasets:
                train = split == "train"
                transform = image_transform(
                    self.preset, train, scale=tuple(self.hparams.crop_scale), hflip=self.hparams.hflip
                )
                self.datasets[split] = self._dataset(split, transform)
