"""Image-text WebDataset shards, split by rank and worker, optionally resampled.

A shard is a ``.tar`` whose members share a key per sample: ``KEY.jpg|png|webp``
plus ``KEY.txt`` (captions, one per line) or ``KEY.json`` (a ``caption_key`` field, a
string or a list of captions), and optionally ``KEY.cls`` (an integer class label).
Reading and grouping tar members is webdataset's; ``shard_samples`` and
``shard_captions`` are how every mmlm shard reader (training here, evaluation in
``mmlm.data.eval_datasets``) reads them. ``ImageTextShards`` decides which worker reads
which shard, and how long an epoch is.

Two modes:

- ``resampled=False``: the shard list is split rank-first, then by worker; every
  sample is read exactly once per epoch. Ranks with less data end sooner, so give
  ``epoch_length`` for DDP training: each worker then cycles through its shards
  until its share of the epoch is done, and every rank yields the same number of
  batches.
- ``resampled=True`` (OpenCLIP's ``--dataset-resampled``): each worker draws shards
  with replacement from the whole list, forever; ``epoch_length`` (required) cuts
  the stream into epochs of a fixed number of batches.

Batches are built in the workers (bad samples are dropped *before* batching, so
batches stay full) and carry the Skip records for ``SkippingDataLoader``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import warnings
from typing import Any, Callable, Iterator, Sequence

import braceexpand
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mmlm.data.skips import BAD_LABEL, BROKEN_SHARD, MISSING_FIELD, SKIPPED, Skip, check_text, load_image
from mmlm.distributed import world

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard list from brace patterns (``data/{000..099}.tar``), ``::``-joined lists or a list."""
    if isinstance(urls, str):
        urls = urls.split("::")
    return [u for pattern in urls for u in braceexpand.braceexpand(pattern)]


def shard_samples(url: str) -> Iterator[dict[str, Any] | Skip]:
    """The samples of one shard as webdataset groups them (member extension -> bytes, plus
    ``__key__``), then one Skip if the shard broke off: what was read before the error is kept."""
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    yield from wds.tarfile_samples([{"url": url}], handler=handler)
    if errors:
        yield Skip(BROKEN_SHARD, url, f"{type(errors[0]).__name__}: {errors[0]}")


def shard_captions(raw: dict[str, Any], name: str, caption_key: str = "caption") -> list[str] | Skip:
    """A sample's good captions: the lines of its ``txt`` member, or its ``json`` member's
    ``caption_key`` (a string or a list); when none is usable, the first caption's Skip."""
    if "txt" in raw:
        text = check_text(raw["txt"], name)
        if isinstance(text, Skip):
            return text
        candidates: Any = text.splitlines()
    elif "json" in raw:
        try:
            candidates = json.loads(raw["json"]).get(caption_key)
        except (ValueError, AttributeError) as e:
            return Skip(MISSING_FIELD, name, f"json: {e}")
        candidates = candidates if isinstance(candidates, list) else [candidates]
    else:
        return Skip(MISSING_FIELD, name, "no txt or json member")
    checked = [check_text(c, name) for c in candidates]
    captions = [c for c in checked if not isinstance(c, Skip)]
    return captions or (checked[0] if checked else Skip(MISSING_FIELD, name, "no caption"))


def shard_label(raw: dict[str, Any], name: str) -> int | Skip:
    """The integer ``cls`` member (CLIP_benchmark's classification shards)."""
    try:
        return int(raw["cls"])
    except (KeyError, ValueError) as e:
        return Skip(BAD_LABEL, name, f"cls: {e!r}")


def image_id_of(url: str, key: str) -> int:
    """A stable 63-bit id for a shard sample (same image -> same id on every rank)."""
    digest = hashlib.blake2b(f"{os.path.basename(url)}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageTextShards(IterableDataset):
    """Collated image-text batches streamed from WebDataset shards.

    Args:
        urls: shard paths or URLs webdataset can open (brace patterns allowed).
        collate: list of samples -> batch dict (e.g. ``ImageTextCollator``).
        batch_size: samples per batch (per rank).
        transform: applied to each RGB PIL image.
        resampled: draw shards with replacement (see module docstring).
        epoch_length: samples per epoch over all ranks; required when resampled.
        shuffle: shuffle shard order and samples (buffer of ``shuffle_buffer``).
        caption_key: field of a ``.json`` member holding the caption(s).
        seed: base seed; shard order depends on (seed, epoch) only, so every rank
            agrees on the split.
        rank / world_size: default ``world(launcher_env=True)`` at construction.
        num_workers: the DataLoader's, to size each worker's share of the epoch.
        drop_last: drop a worker's final partial batch (one-pass mode only).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        collate: Callable[[list[Any]], dict[str, Any]],
        batch_size: int,
        transform: Callable | None = None,
        resampled: bool = False,
        epoch_length: int | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        caption_key: str = "caption",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        if resampled and epoch_length is None:
            raise ValueError("resampled shards are an endless stream: give epoch_length")
        r, w = world(launcher_env=True)
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not resampled and len(self.urls) < self.world_size:
            raise ValueError(
                f"{len(self.urls)} shards cannot be split over {self.world_size} ranks: a rank would read nothing. "
                "Use at least as many shards as ranks (or, for training, resampled=True)"
            )
        if not resampled and epoch_length is None and len(self.urls) < self.world_size * max(1, num_workers):
            warnings.warn(
                f"{len(self.urls)} shards for {self.world_size} ranks x {max(1, num_workers)} workers: "
                "some workers get no shard and read nothing",
                stacklevel=2,
            )
        self.collate, self.batch_size, self.transform = collate, batch_size, transform
        self.resampled, self.epoch_length = resampled, epoch_length
        self.shuffle, self.shuffle_buffer, self.caption_key = shuffle, shuffle_buffer, caption_key
        self.seed, self.num_workers, self.drop_last = seed, num_workers, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def batches_per_worker(self) -> int | None:
        if self.epoch_length is None:
            return None
        per_rank = math.ceil(self.epoch_length / (self.batch_size * self.world_size))
        return math.ceil(per_rank / max(1, self.num_workers))

    def __len__(self) -> int:
        """Batches per rank and epoch; only known with ``epoch_length``."""
        if self.batches_per_worker is None:
            raise TypeError("the length of a one-pass shard stream is unknown; give epoch_length")
        # every worker yields the same share, so the DataLoader's length is exact
        return self.batches_per_worker * max(1, self.num_workers)

    # ---------------------------------------------------------------- the stream
    def _worker_shards(self) -> Iterator[str]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.resampled:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
            while True:
                yield rng.choice(self.urls)
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        mine = order[self.rank :: self.world_size][worker::n_workers]
        if self.epoch_length is None:
            yield from mine
            return
        # With a declared epoch length every worker must fill its share, so it cycles
        # (and a worker left without a shard borrows its rank's): no rank runs short.
        yield from itertools.cycle(mine or order[self.rank :: self.world_size])

    def _decode(self, raw: dict[str, Any], url: str) -> dict[str, Any] | Skip:
        key = raw.get("__key__", "?")
        name = f"{url}:{key}"
        image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if image_ext is None:
            return Skip(MISSING_FIELD, name, f"members {sorted(k for k in raw if not k.startswith('__'))}")
        captions = shard_captions(raw, name, self.caption_key)
        if isinstance(captions, Skip):
            return captions
        label = shard_label(raw, name) if "cls" in raw else None
        if isinstance(label, Skip):
            return label
        image = load_image(raw[image_ext], f"{name}.{image_ext}")
        if isinstance(image, Skip):
            return image
        if self.transform is not None:
            image = self.transform(image)
        text = captions[0] if len(captions) == 1 else random.choice(captions)
        item = {"image": image, "text": text, "image_id": image_id_of(url, key), "key": name}
        return item if label is None else {**item, "label": label}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        samples: Iterator[Any] = (
            self._decode(raw, url) if isinstance(raw, dict) else raw
            for url in self._worker_shards()
            for raw in shard_samples(url)
        )
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{info.id if info else 0}")
            samples = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(samples)
        return self._batched(samples, self.batches_per_worker)

    def _batched(self, samples: Iterator[Any], limit: int | None) -> Iterator[dict[str, Any]]:
        """Full batches of good samples, each carrying the Skips met since the previous one.

        ``limit`` counts batches with samples only, so that a rank's length does
        not depend on how many bad samples it met.
        """
        good: list[dict[str, Any]] = []
        skips: list[Skip] = []
        n_batches = n_good = 0
        if limit == 0:
            return
        for s in samples:
            if isinstance(s, Skip):
                skips.append(s)
                # hand the skips on, so the main process can fail early on an all-bad stream
                if n_good == 0 and len(skips) >= 1000:
                    yield {SKIPPED: skips}
                    skips = []
                continue
            good.append(s)
            n_good += 1
            if len(good) == self.batch_size:
                yield {**self.collate(good), SKIPPED: skips}
                good, skips = [], []
                n_batches += 1
                if n_batches == limit:
                    return
        if good and not self.drop_last:
            yield {**self.collate(good), SKIPPED: skips}
        elif skips:
            yield {SKIPPED: skips}
