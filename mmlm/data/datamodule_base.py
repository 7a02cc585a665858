"""What every task's LightningDataModule shares: loaders, skip statistics, stages, the tokenizer.

The data modules themselves, one per task and configured from YAML through LightningCLI, are in
``image_datamodules`` (image-text, image classification) and ``text_datamodules`` (language modelling,
text and token classification, question answering); configs name them through the package
(``mmlm.data.ImageTextDataModule``).

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

from mmlm.data.skips import ReplaceBad, SkippingDataLoader, SkipStats
from mmlm.data.tokenizers import Tokenizer, get_tokenizer
from mmlm.data.webdataset import ImageTextShards

Stage = Literal["train", "val", "test"]
BadSamples = Literal["drop", "replace"]


def _passthrough(batch: Any) -> Any:
    return batch


class BaseDataModule(L.LightningDataModule):
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


def stages(stage: str | None) -> tuple[Stage, ...]:
    """The splits a Lightning stage (``fit``, ``validate``, ``test``, ``predict``) needs; all three for None."""
    return {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(
        stage or "", ("train", "val", "test")
    )


class TokenizerMixin:
    """The tokenizer, made on first use (a data module is built before the model it configures), and the
    attributes the CLI links from it into the model."""

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
