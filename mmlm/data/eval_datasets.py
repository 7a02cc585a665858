"""Evaluation datasets, read as CLIP_benchmark reads them: ``classification_data`` for
``mmlm zeroshot``, ``retrieval_data`` for ``mmlm eval-retrieval``. The kinds of ``spec``
are those of ``mmlm.data.sources``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmlm.data.collators import ImageClassificationCollator
from mmlm.data.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, digits_image_text
from mmlm.data.image_datasets import ImageClassificationDataset, ImageTextDataset
from mmlm.data.skips import (
    MISSING_FIELD,
    SKIPPED,
    Skip,
    SkippingDataLoader,
    SkipStats,
    check_text,
    load_image,
    split_skips,
)
from mmlm.data.sources import DIGITS, find_shards, is_digits, metadata
from mmlm.data.webdataset import IMAGE_EXTS, expand_urls, shard_captions, shard_label, shard_samples
from mmlm.paths import resolve


@dataclass
class EvalData:
    """A dataset to evaluate on and what it says about itself."""

    dataset: Dataset
    collate: Callable[[list[Any]], dict[str, Any]]
    classes: list[str] | None = None  # class names in label order (classification)
    templates: list[str] | None = None  # the dataset's own prompt templates, if it has any

    def loader(self, batch_size: int = 64, num_workers: int = 0) -> SkippingDataLoader:
        """Batches in dataset order; bad samples are skipped and counted (``loader.stats``)."""
        return SkippingDataLoader(
            self.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=self.collate,
            stats=SkipStats("eval"),
        )  # fmt: skip


def collate_image_captions(samples: Sequence[Any]) -> dict[str, Any]:
    """``image`` (B, 3, H, W) and ``captions`` (B lists of strings); Skips go under ``skipped``."""
    good, skips = split_skips(samples)
    batch: dict[str, Any] = {SKIPPED: skips}
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
        batch["captions"] = [s["captions"] for s in good]
    return batch


class ImageCaptions(Dataset):
    """One item per image with all of its captions, ``{"image", "captions"}``, from a manifest with
    one row per caption (rows naming the same image are grouped, as in ``ImageTextDataset``).

    An image that cannot be read, or whose captions are all bad, is skipped with its captions.
    """

    def __init__(
        self, manifest: str | Path, transform: Callable | None = None, image_key: str = "filepath",
        caption_key: str = "title",
    ) -> None:  # fmt: skip
        pairs = ImageTextDataset(manifest, image_key, caption_key)
        self.images, self.texts, self.transform = pairs.images, pairs.texts, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> dict[str, Any] | list[Skip]:
        path = self.images[idx]
        checked = [check_text(t, f"{path} caption {j}") for j, t in enumerate(self.texts[idx])]
        skips = [c for c in checked if isinstance(c, Skip)]
        captions = [c for c in checked if not isinstance(c, Skip)]
        image = load_image(path) if captions else None
        if image is None or isinstance(image, Skip):
            return skips + ([image] if isinstance(image, Skip) else [])
        item = {"image": self.transform(image) if self.transform else image, "captions": captions}
        return {**item, SKIPPED: skips} if skips else item


class EvalShards(IterableDataset):
    """One pass over WebDataset shards, each read once (split over DataLoader workers).

    Items are ``{"image", "label"}`` (``target="label"``: an integer ``cls`` member, as
    CLIP_benchmark writes classification sets) or ``{"image", "captions"}``
    (``target="captions"``: a ``txt`` member with one caption per line, or a ``json``
    member whose ``caption_key`` holds a string or a list).
    """

    def __init__(
        self, urls: str | Sequence[str], transform: Callable | None, target: Literal["label", "captions"],
        caption_key: str = "caption",
    ) -> None:  # fmt: skip
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        self.transform, self.target, self.caption_key = transform, target, caption_key

    def __iter__(self) -> Iterator[dict[str, Any] | Skip]:
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for url in urls:
            for raw in shard_samples(url):
                yield self._decode(raw, url)

    def _decode(self, raw: dict[str, Any] | Skip, url: str) -> dict[str, Any] | Skip:
        if isinstance(raw, Skip):
            return raw
        name = f"{url}:{raw.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            return Skip(MISSING_FIELD, name, "no image member")
        target = shard_label(raw, name) if self.target == "label" else shard_captions(raw, name, self.caption_key)
        if isinstance(target, Skip):
            return target
        image = load_image(raw[ext], f"{name}.{ext}")
        if isinstance(image, Skip):
            return image
        return {"image": self.transform(image) if self.transform else image, self.target: target}


class _Mapped(Dataset):
    def __init__(self, dataset: Dataset, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.dataset, self.fn = dataset, fn

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.fn(self.dataset[idx])


def _one_caption(sample: dict[str, Any]) -> dict[str, Any]:
    return {"image": sample["image"], "captions": [sample["text"]]}


def _display_names(found: list[str], given: Sequence[str] | None, source: str) -> list[str]:
    if given is None:
        return found
    if len(given) != len(found):
        raise ValueError(f"{len(given)} class names given, but {source} has {len(found)} classes: {found[:10]}")
    return list(given)


def classification_data(
    spec: str | Path,
    transform: Callable,
    split: str = "test",
    classnames: Sequence[str] | None = None,
    image_key: str = "filepath",
    label_key: str = "label",
) -> EvalData:
    """Labelled images for zero-shot classification (see the module docstring for ``spec``).

    ``classnames`` are display names in label order: for an ImageFolder, of the sorted
    folder names; for a manifest with integer labels, of 0, 1, ...; for a manifest with
    named labels, the names themselves in the order to use.
    """
    text = str(spec)
    collate = ImageClassificationCollator()
    if is_digits(spec):
        ds = digits_image_text(split, transform=transform)  # type: ignore[arg-type]
        names = _display_names(list(DIGIT_CLASSNAMES), classnames, DIGITS)
        return EvalData(ds, collate, names, list(DIGIT_TEMPLATES))
    shards = find_shards(spec, split)
    if shards is not None:
        urls, meta = shards
        names = list(classnames) if classnames is not None else metadata(meta, "classnames.txt")
        return EvalData(EvalShards(urls, transform, "label"), collate, names,
                        metadata(meta, "zeroshot_classification_templates.txt"))  # fmt: skip
    path = resolve(text)
    if path.is_dir():
        ds = ImageClassificationDataset(path, transform)
        return EvalData(ds, collate, _display_names(ds.classes, classnames, str(path)))
    if path.is_file():
        ds = ImageClassificationDataset(path, transform, image_key, label_key)
        numeric = ds.classes == [str(i) for i in range(len(ds.classes))]
        if classnames is not None and not numeric:  # named labels: the given list fixes their order
            ds = ImageClassificationDataset(path, transform, image_key, label_key, classes=list(classnames))
            return EvalData(ds, collate, list(classnames))
        if classnames is not None and len(classnames) < len(ds.classes):
            raise ValueError(f"{len(classnames)} class names given, but {path} has labels up to {len(ds.classes) - 1}")
        return EvalData(ds, collate, list(classnames) if classnames is not None else ds.classes)
    raise FileNotFoundError(f"dataset {text!r}: not 'digits', a folder, a manifest file or WebDataset shards")


def retrieval_data(
    spec: str | Path,
    transform: Callable,
    split: str = "test",
    image_key: str = "filepath",
    caption_key: str | None = None,
) -> EvalData:
    """Images with one or more captions each, for retrieval (see the module docstring for ``spec``).

    ``caption_key``: the manifest column (default ``title``) or the shard json field (default ``caption``).
    """
    text = str(spec)
    if is_digits(spec):
        digits = digits_image_text(split, transform=transform)  # type: ignore[arg-type]
        return EvalData(_Mapped(digits, _one_caption), collate_image_captions)
    shards = find_shards(spec, split)
    if shards is not None:
        return EvalData(EvalShards(shards[0], transform, "captions", caption_key or "caption"), collate_image_captions)
    if resolve(text).is_file():
        return EvalData(ImageCaptions(resolve(text), transform, image_key, caption_key or "title"), collate_image_captions)
    raise FileNotFoundError(f"dataset {text!r}: not 'digits', a manifest file or WebDataset shards")
