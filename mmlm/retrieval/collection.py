"""What ``mmlm index`` embeds: any DATA as items with a stable key, their captions and metadata.

An item is one image with its good captions (none for a folder of photos)::

    {"image": (3, H, W), "captions": [str, ...], "key": int, "meta": {column: value}, "item_skips": [reason, ...]}

DATA is any kind ``mmlm.data.sources`` reads for retrieval (``digits``, a CSV / TSV / JSONL manifest,
WebDataset shards), plus ``assets`` (the bundled photographs and their captions) and a folder of
images (searched recursively; any file that is not an image is left alone). Bad samples come back
as :class:`~mmlm.data.skips.Skip` records, so ``SkippingDataLoader`` drops and counts them exactly
as it does for training.

The ``key`` orders items and survives being interrupted: the item's position in a manifest, a
folder listing or a digits split, or ``shard number << 32 | sample number`` in shards. The final
ids are the keys' ranks, so one process or many, resumed or not, give the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Collection as Keys
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS

from mmlm.data.digits import DIGIT_CLASSNAMES, digits_image_text
from mmlm.data.eval_datasets import EvalShards, collate_image_captions, retrieval_data
from mmlm.data.manifest import read_manifest
from mmlm.data.skips import SKIPPED, Skip, load_image, split_skips
from mmlm.data.sources import find_shards, is_digits
from mmlm.data.tokenizers import Tokenizer
from mmlm.paths import ASSETS, resolve
from mmlm.retrieval.options import BUNDLED as BUNDLED
from mmlm.retrieval.options import IMAGE_KEY, SPLIT

CAPTION_KEYS = ("caption", "title")  # a manifest's caption column, when not named: the first one it has
SHARD_BITS = 32  # a shard sample's key: shard number << 32 | sample number in the shard


@dataclass
class Collection:
    """DATA, read as items: a map-style ``dataset`` whose index is the key, or ``shards``."""

    spec: str  # DATA: an absolute path for local files, else as given
    dataset: Dataset | None = None
    meta: Sequence[dict[str, Any]] = ()  # per key of ``dataset``: the metadata columns
    shards: list[str] | None = None
    transform: Callable | None = None
    caption_key: str = "caption"

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0  # type: ignore[arg-type]

    def share(self, done: Keys[int], rank: int = 0, world: int = 1) -> Dataset:
        """What this rank embeds: every ``world``-th item not ``done``, in key order."""
        if self.shards is not None:
            return KeyedShards(self.shards, self.transform, self.caption_key, done, rank, world)
        todo = [k for k in range(len(self)) if k not in done]
        return Keyed(self.dataset, todo[rank::world], self.meta)  # type: ignore[arg-type]

    def remaining(self, done: Keys[int]) -> int | None:
        """Items left to embed (None for shards: their length is known only once read)."""
        return None if self.shards is not None else len(self) - len(done)


def collection(
    spec: str | Path, transform: Callable, split: str = SPLIT, image_key: str = IMAGE_KEY,
    caption_key: str | None = None,
) -> Collection:
    """The items of DATA (see the module docstring); FileNotFoundError when it names nothing."""
    text = str(spec)
    if is_digits(text):
        digits = digits_image_text(split)  # type: ignore[arg-type]
        meta = [{"index": i, "label": int(y), "name": DIGIT_CLASSNAMES[y]} for i, y in enumerate(digits.labels)]
        return Collection(text, retrieval_data(text, transform, split).dataset, meta)
    shards = find_shards(text, split)
    if shards is not None:
        return Collection(text, shards=shards[0], transform=transform, caption_key=caption_key or "caption")
    path = ASSETS / "captions.csv" if text == BUNDLED else resolve(text)
    if path.is_dir():
        files = folder_images(path)
        if not files:
            raise FileNotFoundError(f"DATA {text!r}: a folder without images ({', '.join(IMG_EXTENSIONS)})")
        return Collection(str(path.resolve()), ImageFiles([str(f) for f in files], transform, record=True),
                          [{"filepath": str(f.relative_to(path))} for f in files])  # fmt: skip
    if path.is_file():
        return _manifest(text if text == BUNDLED else str(path.resolve()), path, transform, image_key, caption_key)
    raise FileNotFoundError(
        f"DATA {text!r}: not 'digits', 'assets', a folder of images, a manifest file or WebDataset shards"
    )


def _manifest(spec: str, path: Path, transform: Callable, image_key: str, caption_key: str | None) -> Collection:
    """One item per image of the manifest, its metadata the image's first row (any other columns included)."""
    rows = read_manifest(path)
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    columns = list(dict.fromkeys(c for row in rows for c in row))
    if image_key not in columns:
        raise ValueError(f"manifest {path} has no column {image_key!r}; it has {columns}")
    caption_key = caption_key or next((c for c in CAPTION_KEYS if c in columns), None)
    if caption_key is not None and caption_key not in columns:
        raise ValueError(f"manifest {path} has no column {caption_key!r}; it has {columns}")
    first: dict[str, dict[str, Any]] = {}
    for row in rows:  # the paths exactly as ImageTextDataset groups rows into images
        rel = row.get(image_key)
        first.setdefault(str(path.parent / rel) if isinstance(rel, str) and rel else f"<row without {image_key}>", row)
    if caption_key is None:
        images = list(first)
        dataset: Dataset = ImageFiles(images, transform)
    else:
        dataset = retrieval_data(path, transform, image_key=image_key, caption_key=caption_key).dataset
        images = dataset.images  # type: ignore[attr-defined]
    meta = [{c: v for c, v in first[p].items() if c != caption_key} for p in images]
    return Collection(spec, dataset, meta, caption_key=caption_key or "caption")


def folder_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, by suffix), sorted: the items of a folder, in key order."""
    return [folder / rel for rel in sorted(image_files(folder), key=lambda rel: rel.split("/"))]  # Path's order


def image_files(folder: Path) -> dict[str, os.stat_result]:
    """Each image file under ``folder`` (by suffix; a symlink to a file counts, a symlinked folder is not entered, as
    with ``rglob``): its path relative to ``folder`` -> its ``stat``. One stat a file: ``index sync`` lists a whole
    folder each time, and pathlib's ``rglob`` + ``is_file`` + ``stat`` take 10x longer."""
    found: dict[str, os.stat_result] = {}
    prefix = len(os.path.join(str(folder), ""))
    for top, _, names in os.walk(folder):
        for name in names:
            if os.path.splitext(name)[1].lower() not in IMG_EXTENSIONS:
                continue
            path = os.path.join(top, name)
            try:
                stat = os.stat(path)
            except OSError:  # a broken symlink, or gone since the listing
                continue
            if S_ISREG(stat.st_mode):
                found[path[prefix:].replace(os.sep, "/")] = stat
    return found


def file_record(path: str | Path) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes and what ``mmlm index sync`` tells a change by: ``mtime`` (ns), ``size`` and ``sha256``
    (of the bytes: a touched file keeps its hash, a renamed one takes it along). OSError if it cannot be read."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())  # of the bytes read, not of a later replacement of the path
        data = f.read()
    return data, {"mtime": stat.st_mtime_ns, "size": stat.st_size, "sha256": hashlib.sha256(data).hexdigest()}


class ImageFiles(Dataset):
    """Images without captions: ``{"image", "captions": []}`` per path, or the Skip saying why not. With
    ``record``, each item also carries ``file``: its ``file_record`` (a folder's items; the file is read once)."""

    def __init__(self, paths: Sequence[str], transform: Callable | None, record: bool = False) -> None:
        self.paths, self.transform, self.record = list(paths), transform, record

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> dict[str, Any] | Skip:
        path, record = self.paths[idx], None
        if self.record:
            try:
                data, record = file_record(path)
            except OSError:  # gone or unreadable: load_image says which, as a Skip
                image = load_image(path)
            else:
                image = load_image(data, path)
        else:
            image = load_image(path)
        if isinstance(image, Skip):
            return image
        item = {"image": self.transform(image) if self.transform else image, "captions": []}
        return item if record is None else {**item, "file": record}


class Keyed(Dataset):
    """The items of ``keys`` (indices of ``dataset``) with their key and metadata; bad ones stay Skips."""

    def __init__(self, dataset: Dataset, keys: Sequence[int], meta: Sequence[dict[str, Any]]) -> None:
        self.dataset, self.keys, self.meta = dataset, list(keys), meta

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, idx: int) -> Any:
        key = self.keys[idx]
        item = self.dataset[key]
        return _keyed(item, key, self.meta[key]) if isinstance(item, dict) else item


def _keyed(item: dict[str, Any], key: int, meta: dict[str, Any]) -> dict[str, Any]:
    # a good image's bad captions: counted by the loader, and kept with the item so that a resumed
    # build, which does not read this item again, still counts them
    meta = {**meta, **item.get("file", {})}  # a folder's file record: mtime, size, sha256
    return {**item, "key": key, "meta": meta, "item_skips": [s.reason for s in item.get(SKIPPED, ())]}


class KeyedShards(EvalShards):
    """WebDataset shards read once, shard by shard: this rank's every ``world``-th shard, split over the
    DataLoader workers, without the samples ``done``. Metadata: ``shard``, ``key`` and the fields of a
    ``json`` member other than the caption."""

    def __init__(
        self, urls: Sequence[str], transform: Callable | None, caption_key: str, done: Keys[int], rank: int, world: int
    ) -> None:  # fmt: skip
        super().__init__(urls, transform, "captions", caption_key)
        self.done, self.rank, self.world = done, rank, world

    def __iter__(self) -> Iterator[dict[str, Any] | Skip]:
        from mmlm.data.webdataset import shard_samples

        info = get_worker_info()
        mine = list(enumerate(self.urls))[self.rank :: self.world]
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        for number, url in mine:
            for i, raw in enumerate(shard_samples(url)):
                key = number << SHARD_BITS | i
                if key in self.done:
                    continue
                item = self._decode(raw, url)
                yield _keyed(item, key, self._meta(raw, url)) if isinstance(item, dict) else item

    def _meta(self, raw: dict[str, Any], url: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"shard": url, "key": raw.get("__key__")}
        try:
            fields = json.loads(raw["json"]) if "json" in raw else {}
        except ValueError:  # the captions came from a txt member: a broken json is no reason to drop the image
            fields = {}
        if isinstance(fields, dict):
            meta.update((k, v) for k, v in fields.items() if k != self.caption_key and k not in meta)
        return meta


class CollateItems:
    """Images stacked, every caption tokenised (``text_item``: the batch row each belongs to), keys and
    metadata as lists; Skips under ``skipped`` for ``SkippingDataLoader``."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        batch = collate_image_captions(samples)
        good, _ = split_skips(samples)
        if not good:
            return batch
        captions = batch.pop("captions")
        batch["key"] = torch.tensor([s["key"] for s in good], dtype=torch.long)
        batch["meta"] = [s["meta"] for s in good]
        batch["item_skips"] = [s["item_skips"] for s in good]
        texts = [c for caps in captions for c in caps]
        batch["captions"] = texts
        batch["text_item"] = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.long)
        if texts and self.tokenizer is not None:
            batch.update(self.tokenizer(texts))
        return batch
