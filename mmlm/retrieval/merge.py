"""The chunks of an index job merged into the rows of one version, with memory bounded by one chunk.

An index's ids are the ranks of the items' keys, so that a build on any number of ranks gives the same ids;
but each rank writes its own chunks (rank r of R embeds the keys r, r + R, ...), so a chunk's rows land all
over the version's files. Two passes over the chunks::

    pass 1 (``merge``)          the keys of every chunk (and its texts' keys): the row each of its
                                embeddings goes to, the duplicates checked, the texts' owners
    pass 2 (``Merged.parts``)   one chunk at a time: its embeddings, their rows, its items' metadata
                                (``write.write_index`` writes them where they go)

Memory: one chunk, plus small integers for every item and text (8 bytes each kept: its row; 24-32 while
pass 1 sorts the keys), never every embedding at once (a million 512-d float32 rows are 2 GB).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmlm.data.skips import NoGoodSamples
from mmlm.retrieval.work import Work, chunk_dim, read_chunk, run_of


@dataclass
class Part:
    """Some merged items: ``image[j]`` is item row ``rows[j]`` (its id: the base index's length plus the row),
    ``text[j]`` is text row ``text_rows[j]``; ``items``: the metadata of ``image``'s rows, in that order, each
    item's ``captions`` those of its text rows in their order."""

    rows: np.ndarray
    image: np.ndarray
    text_rows: np.ndarray
    text: np.ndarray
    items: list[dict[str, Any]]


@dataclass
class Merged:
    """``n`` items of ``dim``-d embeddings, rows in key order; ``text_owner``: the item row of each text row
    (texts grouped by item, each item's captions in their order); ``parts``: the rows and items, one part
    (chunk) at a time, read again on each call."""

    n: int
    dim: int
    text_owner: np.ndarray
    parts: Callable[[], Iterator[Part]]

    @classmethod
    def held(cls, image: np.ndarray, text: np.ndarray, text_owner: np.ndarray, items: list[dict[str, Any]]) -> Merged:
        """Rows merged already, in memory (the vectors of a benchmark or a test): one part, in order."""
        part = Part(np.arange(len(image)), image, np.arange(len(text)), text, items)
        return cls(len(image), int(image.shape[1]), np.asarray(text_owner, np.int64), lambda: iter([part]))


def merge(work: Work, run: str) -> tuple[Merged, dict[str, int]]:
    """Every chunk of ``work`` in one (``Merged``: its rows are read when written), and the skip counts of the
    whole build; ``run`` names this embedding pass (the skips of a resumed pass's items were counted then)."""
    chunks = work.chunk_files()
    keys, text_keys = [], []
    skipped: Counter = Counter()
    for chunk in chunks:  # pass 1: the keys only (and the items of earlier passes, for their skips)
        found = read_chunk(chunk, "key", "text_key", *(("items",) if run_of(chunk) != run else ()))
        keys.append(found["key"])
        text_keys.append(found.get("text_key", np.zeros(0, np.int64)))
        skipped.update(r for item in found.get("items", []) for r in item["skips"])
    for path in work.counts.glob(f"{run}-r*.json"):
        skipped.update(json.loads(path.read_text())["counts"])
    if not chunks:
        raise NoGoodSamples(f"not one good sample to index (skipped per reason: {dict(skipped)})")
    key, sizes = np.concatenate(keys), [len(k) for k in keys]
    text_key, text_sizes = np.concatenate(text_keys), [len(k) for k in text_keys]
    del keys, text_keys
    order = np.argsort(key, kind="stable")
    key = key[order]
    if (key[1:] == key[:-1]).any():
        raise RuntimeError(f"{work.root}: an item was embedded twice; rerun without --resume")
    rows = _inverse(order)
    text_order = np.argsort(text_key, kind="stable")  # by item, each item's captions in their chunk's order
    text_owner = np.searchsorted(key, text_key[text_order])
    text_rows = _inverse(text_order)
    del key, order, text_key, text_order
    dim = chunk_dim(chunks[0])
    # each chunk's share of ``rows`` and ``text_rows``: views, no copies
    plan = list(zip(chunks, np.split(rows, np.cumsum(sizes)[:-1]), np.split(text_rows, np.cumsum(text_sizes)[:-1])))
    return Merged(len(rows), dim, text_owner, lambda: _read_parts(plan, dim)), dict(sorted(skipped.items()))


def _inverse(order: np.ndarray) -> np.ndarray:
    """Where each position goes when sorted by ``order``: ``_inverse(order)[order] == arange``."""
    out = np.empty_like(order)
    out[order] = np.arange(len(order))
    return out


def _read_parts(plan: list[tuple[Path, np.ndarray, np.ndarray]], dim: int) -> Iterator[Part]:
    """Pass 2: one chunk at a time, its embeddings, metadata and rows."""
    for chunk, rows, text_rows in plan:
        found = read_chunk(chunk, "image", "text", "items")
        captions = sum(len(item["captions"]) for item in found["items"])
        if captions != len(text_rows) or len(found["items"]) != len(rows):
            raise RuntimeError(f"{chunk}: {len(found['items'])} items with {captions} captions, but {len(rows)} "
                               f"image and {len(text_rows)} text embeddings")  # fmt: skip
        text = found.get("text", np.zeros((0, dim), np.float32))
        yield Part(rows, found["image"], text_rows, text, found["items"])
