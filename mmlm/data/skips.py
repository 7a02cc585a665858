"""Bad samples: skip them, count them per reason, never die on one.

How it works, whatever the number of DataLoader workers::

    dataset.__getitem__ / webdataset stage      collator                     SkippingDataLoader (main process)
    ── returns Skip(reason, path) ───────────►  drops Skips, puts them  ──►  pops them, counts per reason, logs the
       instead of raising                       under batch["skipped"]       first path per reason, drops empty
                                                                             batches, reports at the end of the epoch

The counts travel inside the batches, so they are exact with any ``num_workers``
and need no shared memory; each rank counts what it read.

Dropping makes a batch shorter. Where every rank needs full, equal batches (DDP
training, features gathered across ranks), wrap the training set in
:class:`ReplaceBad`: a bad sample's slot is filled by another, random sample and
its Skip rides along with the replacement, so it is still counted. Counts are
then per read: a bad file drawn again as a replacement counts again.
(WebDataset shards need neither: bad samples are dropped before batching.)
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from mmlm.data.images import CORRUPT_IMAGE as CORRUPT_IMAGE
from mmlm.data.images import DECOMPRESSION_BOMB as DECOMPRESSION_BOMB
from mmlm.data.images import EMPTY_FILE as EMPTY_FILE
from mmlm.data.images import MISSING_FILE as MISSING_FILE
from mmlm.data.images import Skip as Skip
from mmlm.data.images import load_image as load_image

log = logging.getLogger("mmlm.data")

SKIPPED = "skipped"  # batch key holding the list of Skip records of that batch

# Reasons (the image ones, and Skip itself, are in mmlm.data.images); a new source of bad samples may add its own.
EMPTY_TEXT = "empty_text"  # empty or whitespace-only caption / text
NON_TEXT = "non_text"  # a caption that is not a string, or has undecodable bytes
MISSING_FIELD = "missing_field"  # a shard sample without an image or a caption member
BROKEN_SHARD = "broken_shard"  # a tar that cannot be read to its end
BAD_LABEL = "bad_label"


class NoGoodSamples(RuntimeError, ValueError):
    """Not one usable sample: the data the user pointed at is wrong (a ValueError), found mid-run."""


def split_skips(samples: Sequence[Any]) -> tuple[list[Any], list[Skip]]:
    """(good samples, Skip records): the first thing every collator does.

    A sample is a dict (possibly carrying ``SKIPPED`` records from ``ReplaceBad``),
    a Skip, or a list of Skips (``ReplaceBad`` gave up on that slot).
    """
    good: list[Any] = []
    skips: list[Skip] = []
    for s in samples:
        if isinstance(s, Skip):
            skips.append(s)
        elif isinstance(s, list):
            skips.extend(s)
        elif isinstance(s, dict) and SKIPPED in s:
            s = dict(s)
            skips.extend(s.pop(SKIPPED))
            good.append(s)
        else:
            good.append(s)
    return good, skips


class ReplaceBad(Dataset):
    """Fill a bad sample's slot with another, random one, so that batches stay full.

    Args:
        dataset: a map-style dataset that returns Skip for bad samples.
        max_tries: replacements tried per slot before giving up on it (the slot is
            then dropped, and an all-bad dataset still fails through SkipStats).
    """

    def __init__(self, dataset: Dataset, max_tries: int = 100) -> None:
        self.dataset = dataset
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # classes, examples, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int) -> Any:
        item = self.dataset[idx]
        skips: list[Skip] = []
        while isinstance(item, Skip) and len(skips) < self.max_tries:
            skips.append(item)
            # python's random is seeded per DataLoader worker, so workers draw differently
            item = self.dataset[random.randrange(len(self))]
        if isinstance(item, Skip):
            return skips + [item]
        return {**item, SKIPPED: skips} if skips else item


def check_text(text: Any, name: str) -> str | Skip:
    """The stripped text, or a Skip for an empty / non-text caption."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return Skip(NON_TEXT, name, "undecodable bytes")
    if not isinstance(text, str):
        return Skip(NON_TEXT, name, f"{type(text).__name__} {text!r:.40}")
    if "\ufffd" in text:  # what errors="replace" left of undecodable bytes in a manifest
        return Skip(NON_TEXT, name, "undecodable bytes")
    text = text.strip()
    if not text:
        return Skip(EMPTY_TEXT, name)
    return text


def batch_len(batch: dict[str, Any]) -> int:
    """Number of samples in a collated batch (0 for a batch whose samples were all bad)."""
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.shape[0]
        if isinstance(v, list) and v:
            return len(v)
    return 0


@dataclass
class SkipStats:
    """Per-reason counts of skipped samples; logs the first offender of each reason once."""

    name: str = "data"
    fail_after: int = 1000  # raise once this many samples in a row were bad before any good one
    counts: Counter = field(default_factory=Counter)  # this epoch
    total: Counter = field(default_factory=Counter)  # since creation
    history: list[dict[str, int]] = field(default_factory=list)  # one dict per finished epoch
    good: int = 0  # good samples this epoch
    first: dict[str, Skip] = field(default_factory=dict)  # first offender per reason

    def start_epoch(self) -> None:
        self.counts = Counter()
        self.good = 0

    def add(self, skips: Sequence[Skip], good: int) -> None:
        for s in skips:
            self.counts[s.reason] += 1
            self.total[s.reason] += 1
            if s.reason not in self.first:
                self.first[s.reason] = s
                detail = f" ({s.detail})" if s.detail else ""
                log.warning(
                    "%s: skipping bad sample [%s] %s%s; further [%s] samples are only counted",
                    self.name, s.reason, s.path, detail, s.reason,
                )  # fmt: skip
        self.good += good
        bad = sum(self.counts.values())
        if self.good == 0 and bad >= self.fail_after:
            raise NoGoodSamples(self._all_bad_message(f"the first {bad} samples read were all bad"))

    def end_epoch(self) -> dict[str, int]:
        """Log and return this epoch's counts; an epoch with no good sample is an error."""
        bad = sum(self.counts.values())
        report = dict(sorted(self.counts.items()))
        self.history.append(report)
        if bad and self.good == 0:
            raise NoGoodSamples(self._all_bad_message(f"all {bad} samples of the epoch were bad"))
        if bad:
            log.warning("%s: epoch done, %d good samples, %d skipped: %s", self.name, self.good, bad, report)
        return report

    def _all_bad_message(self, what: str) -> str:
        examples = "; ".join(f"{r}: {s.path}" for r, s in self.first.items())
        return (
            f"{self.name}: {what} (per reason: {dict(self.counts)}; first of each: {examples}). "
            "Check the paths (relative to the manifest), column names and files."
        )


class SkippingDataLoader(StatefulDataLoader):
    """A resumable DataLoader that drops the Skip records its collator left in each batch.

    Takes every DataLoader argument plus ``stats`` (a :class:`SkipStats`, shared
    when Lightning re-creates the loader to add a distributed sampler). Batches
    whose samples were all bad are not yielded. At the end of each full pass (just
    before its last batch is handed out: a loop that stops after ``len(loader)``
    batches, as Lightning's does, never asks for the StopIteration) the per-reason
    counts are logged and kept in ``stats.history``; a pass without a single good
    sample raises.

    It is torchdata's ``StatefulDataLoader``: Lightning saves ``state_dict()`` in
    every checkpoint, and a resumed run continues mid-epoch with the very batches
    the interrupted one had not yet seen.
    """

    def __init__(self, *args: Any, stats: SkipStats | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = stats if stats is not None else SkipStats()
        self._epoch = -1  # epoch of the running pass
        self._fetched = 0  # batches drawn in the running pass
        self._resume = False  # the next pass continues a restored one

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if not self._resume:
            self._epoch, self._fetched = self._epoch + 1, 0
        self._resume = False
        # Non-persistent workers copy the dataset at iter() time, so this reaches them.
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self._epoch)
        self.stats.start_epoch()
        try:
            total: int | None = len(self)
        except TypeError:  # an iterable dataset without a length: the StopIteration ends the pass
            total = None
        ended = False
        for batch in super().__iter__():
            self._fetched += 1
            skips = batch.pop(SKIPPED, ()) if isinstance(batch, dict) else ()
            n = batch_len(batch) if isinstance(batch, dict) else 1
            self.stats.add(skips, n)
            if total is not None and self._fetched >= total:
                self.stats.end_epoch()
                ended = True
            if n:
                yield batch
        if not ended:
            self.stats.end_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {"loader": super().state_dict(), "epoch": self._epoch, "fetched": self._fetched}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict["loader"])
        self._epoch, self._fetched, self._resume = state_dict["epoch"], state_dict["fetched"], True
