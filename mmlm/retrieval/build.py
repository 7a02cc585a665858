"""Building an index folder: embed a collection on one process or many, in chunks that survive a kill,
then merge them and rename the result into place.

::

    every rank (Lightning predict)                         rank 0, once every rank is done
    ─────────────────────────────                          ─────────────────────────────────────────────
    its share of the items not yet in a chunk  ──►  chunks/RUN-rRANK-SEQ.npz  ──►  merge: sort by key, ids = ranks
    skip counts of the pass                    ──►  counts/RUN-rRANK.json          write .DIR.partial/index/
                                                                                    rename it to DIR

Everything is written into ``.DIR.partial`` beside ``DIR``, under its lock (``mmlm.outputs``: a second
build or add of ``DIR`` is refused while one runs; a killed one's lock dies with it); ``DIR`` appears (or
replaces the previous index, never a folder that is not one) by a rename at the very end, so a killed
build leaves no ``DIR`` or the previous complete one. SIGTERM stops a build as SIGINT does (``Stopped``),
keeping its chunks. ``--resume`` embeds only the items no chunk holds; the bad samples, which no chunk
holds, are read again and counted in the pass that completes, so the counts come out as an uninterrupted
build's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch import nn
from tqdm.auto import tqdm

from mmlm import outputs
from mmlm.config import PRESETS
from mmlm.data.skips import NoGoodSamples, SkippingDataLoader, SkipStats
from mmlm.factory import load
from mmlm.paths import resolve
from mmlm.retrieval.collection import CollateItems, Collection, collection
from mmlm.retrieval.model import USE, built_with
from mmlm.retrieval.index import (
    EMBEDDINGS,
    FORMAT,
    INDEXES,
    MANIFEST,
    METADATA,
    MODALITIES,
    TEXT_IDS,
    Index,
    check_index_type,
    faiss_index,
)

DEFAULT_CHUNK = 4096  # items per chunk file: what a kill can lose


@dataclass(frozen=True)
class Job:
    """What is being embedded; a ``--resume`` continues only the very same job."""

    command: str  # build | add
    model: str
    weights: str  # weights_hash of the model
    data: str
    split: str
    image_key: str
    caption_key: str | None
    tokenizer: str | None
    act: str | None
    seed: int
    batch_size: int
    base: str | None = None  # add: the manifest being extended (its sha256)
    int8: bool = False  # embedded by an int8 copy of the model (``quantize_int8``)


@dataclass
class Options:
    """How the job is run and written; free to change between a run and its ``--resume``."""

    index_type: str = "auto"
    dtype: str = "float32"
    nprobe: int | None = None
    chunk_size: int = DEFAULT_CHUNK
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"


# ------------------------------------------------------------------------------ the work folder


class Work:
    """``.DIR.partial``: the job, the chunks every rank wrote, their skip counts, the merged index."""

    def __init__(self, out: Path) -> None:
        self.root = outputs.partial(out)
        self.job_file, self.chunks, self.counts, self.index = (
            self.root / "job.json", self.root / "chunks", self.root / "counts", self.root / "index",
        )  # fmt: skip

    def job(self) -> dict[str, Any] | None:
        return json.loads(self.job_file.read_text()) if self.job_file.is_file() else None

    def check(self, job: Job, resume: bool) -> None:
        """Refuse to resume another job (read-only: every rank runs it before the ranks exist)."""
        found = self.job()
        if resume and found is not None and found != asdict(job):
            changed = sorted(k for k, v in asdict(job).items() if found.get(k) != v)
            raise ValueError(
                f"{self.root} holds an interrupted {found.get('command')} with other {', '.join(changed)}: "
                "rerun with the same ones, or without --resume to start over"
            )

    def prepare(self, job: Job, resume: bool) -> None:
        """Rank 0, before any rank reads: continue the same job, else start from nothing."""
        if resume and self.job() == asdict(job):
            shutil.rmtree(self.index, ignore_errors=True)  # a merge that was cut short
            for tmp in self.chunks.glob("*.tmp"):
                tmp.unlink()
            print(f"resuming from {len(list(self.chunks.glob('*.npz')))} chunks in {self.root}", file=sys.stderr)
            return
        if self.job_file.exists() and not resume:
            print(f"starting over: {self.root} held an interrupted build (--resume continues one)", file=sys.stderr)
        outputs.clear(self.root)  # all but the lock this build holds
        self.chunks.mkdir(parents=True)
        self.counts.mkdir()
        self.job_file.write_text(json.dumps(asdict(job), indent=2))

    def done_keys(self) -> set[int]:
        return {int(k) for path in sorted(self.chunks.glob("*.npz")) for k in np.load(path)["key"]}

    def write_chunk(self, name: str, arrays: dict[str, np.ndarray], items: list[dict[str, Any]]) -> None:
        """One file, complete or absent: written under a temporary name, then renamed."""
        tmp = self.chunks / f"{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, items=np.frombuffer(json.dumps(items).encode(), dtype=np.uint8), **arrays)
        os.replace(tmp, self.chunks / f"{name}.npz")

    def read_chunks(self) -> Iterator[tuple[str, dict[str, np.ndarray], list[dict[str, Any]]]]:
        """(run, arrays, items) of every chunk, in name order."""
        for path in sorted(self.chunks.glob("*.npz")):
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files if k != "items"}
                items = json.loads(z["items"].tobytes())
            yield path.name.split("-")[0], arrays, items


# ------------------------------------------------------------------------------ the embedding pass


class RankStats(SkipStats):
    """Per-reason counts of one rank's share. A share may hold only bad samples (or nothing, when
    resuming): whether the whole build found a good one is decided at the merge."""

    def end_epoch(self) -> dict[str, int]:
        report = dict(sorted(self.counts.items()))
        self.history.append(report)
        return report


class ShareData(L.LightningDataModule):
    """Each rank's share of the items no chunk holds yet, in a DataLoader that skips and counts bad ones."""

    def __init__(self, items: Collection, work: Work, job: Job, resume: bool, collate: CollateItems, num_workers: int):
        super().__init__()
        self.items, self.work, self.job, self.resume = items, work, job, resume
        self.collate, self.num_workers = collate, num_workers
        self.stats = RankStats("index", fail_after=sys.maxsize)
        self.run = ""
        self.remaining: int | None = None

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if strategy.root_device.type == "cpu" and self.trainer.num_devices > 1:  # N processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.trainer.num_devices))
        if self.trainer.is_global_zero:
            self.work.prepare(self.job, self.resume)
        self.run = strategy.broadcast(uuid.uuid4().hex[:12])  # names this pass's files on every rank
        strategy.barrier("mmlm-index-work-ready")

    def predict_dataloader(self) -> SkippingDataLoader:
        done = self.work.done_keys()
        self.remaining = self.items.remaining(done)
        share = self.items.share(done, self.trainer.global_rank, self.trainer.world_size)
        return SkippingDataLoader(share, batch_size=self.job.batch_size, shuffle=False, num_workers=self.num_workers,
                                  collate_fn=self.collate, stats=self.stats)  # fmt: skip


class Embedder(L.LightningModule):
    """L2-normalised image embeddings of a batch, and of its captions (``text_key``: their item's key)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may have nothing left to embed

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = {k: batch[k] for k in ("key", "meta", "captions", "item_skips")}
        out["image"] = self.model.encode_image(batch["image"]).float()
        if "input_ids" in batch:
            out["text"] = self.model.encode_text(batch["input_ids"], batch["attention_mask"]).float()
            out["text_key"] = batch["key"][batch["text_item"]]
        return out


class ChunkWriter(BasePredictionWriter):
    """Every ``chunk_size`` items of a rank, one chunk file (and one for what is left at the end)."""

    def __init__(self, work: Work, chunk_size: int) -> None:
        super().__init__(write_interval="batch")
        self.work, self.chunk_size = work, chunk_size
        self.pending: list[dict[str, Any]] = []
        self.seq = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.pending.append(prediction)
        if sum(len(p["key"]) for p in self.pending) >= self.chunk_size:
            self._flush(trainer)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: L.Trainer) -> None:
        if not self.pending:
            return
        batches, self.pending = self.pending, []
        arrays = {"key": torch.cat([b["key"] for b in batches]).cpu().numpy(),
                  "image": torch.cat([b["image"] for b in batches]).cpu().numpy()}  # fmt: skip
        texts = [b for b in batches if "text" in b]
        if texts:
            arrays["text"] = torch.cat([b["text"] for b in texts]).cpu().numpy()
            arrays["text_key"] = torch.cat([b["text_key"] for b in texts]).cpu().numpy()
        items = [{"meta": m, "captions": [], "skips": s} for b in batches for m, s in zip(b["meta"], b["item_skips"])]
        by_key = dict(zip(arrays["key"].tolist(), items))
        for b in texts:
            for key, caption in zip(b["text_key"].tolist(), b["captions"]):
                by_key[key]["captions"].append(caption)
        run = trainer.datamodule.run  # type: ignore[union-attr]
        self.work.write_chunk(f"{run}-r{trainer.global_rank:04d}-{self.seq:06d}", arrays, items)
        self.seq += 1


class ItemProgress(Callback):
    """Images per second and the time left, on rank 0 (its share, times the number of ranks)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            total = trainer.datamodule.remaining  # type: ignore[union-attr]
            self.bar = tqdm(total=total, unit="img", desc="embedding", dynamic_ncols=True, disable=None)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.bar is not None:
            self.bar.update(len(batch["key"]) * trainer.world_size)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------ the merge


def merge(work: Work, run: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Every chunk in one: ``image`` rows sorted by key, ``text`` rows grouped by item (``text_owner``: the
    item row of each), ``items`` (metadata, captions); and the skip counts of the whole build."""
    keys, images, texts, text_keys, items = [], [], [], [], []
    skipped: Counter = Counter()
    for chunk_run, arrays, chunk_items in work.read_chunks():
        keys.append(arrays["key"])
        images.append(arrays["image"])
        if "text" in arrays:
            texts.append(arrays["text"])
            text_keys.append(arrays["text_key"])
        items += chunk_items
        if chunk_run != run:  # this pass did not read these items again: their own skips were counted before
            skipped.update(r for item in chunk_items for r in item["skips"])
    for path in work.counts.glob(f"{run}-r*.json"):
        skipped.update(json.loads(path.read_text())["counts"])
    if not keys:
        raise NoGoodSamples(f"not one good sample to index (skipped per reason: {dict(skipped)})")
    key = np.concatenate(keys)
    order = np.argsort(key, kind="stable")
    key = key[order]
    if len(np.unique(key)) != len(key):
        raise RuntimeError(f"{work.root}: an item was embedded twice; rerun without --resume")
    dim = images[0].shape[1]
    text_key = np.concatenate(text_keys) if text_keys else np.zeros(0, dtype=np.int64)
    text_order = np.argsort(text_key, kind="stable")  # by item, each item's captions in their order
    merged = {
        "image": np.concatenate(images)[order],
        "text": (np.concatenate(texts) if texts else np.zeros((0, dim), np.float32))[text_order],
        "text_owner": np.searchsorted(key, text_key[text_order]),
        "items": [items[i] for i in order],
    }
    return merged, dict(sorted(skipped.items()))


def write_index(
    folder: Path, merged: dict[str, Any], skipped: dict[str, int], job: Job, options: Options, base: Index | None,
    caption_key: str, model: nn.Module, seconds: float,
) -> None:  # fmt: skip
    """``folder``: the base index (if adding) plus the merged items, ids continuing the base's."""
    folder.mkdir(parents=True)
    offset = len(base) if base is not None else 0
    n = len(merged["items"])
    ids = np.arange(offset, offset + n, dtype=np.int64)
    text_ids = ids[merged["text_owner"]]
    dtype = np.dtype(options.dtype)
    arrays = {"image": merged["image"], "text": merged["text"]}
    for modality in MODALITIES:
        old = base.embeddings(modality) if base is not None else None
        _append_npy(folder / EMBEDDINGS[modality], old, arrays[modality], dtype)
    _append_npy(folder / TEXT_IDS, base.text_ids if base is not None else None, text_ids, np.dtype(np.int64))

    indexes = {}
    for modality, vector_ids in (("image", ids), ("text", text_ids)):
        vectors = np.load(folder / EMBEDDINGS[modality], mmap_mode="r")
        old = base.manifest["indexes"].get(modality) if base is not None else None
        if old is not None:
            index = faiss.read_index(str(base.folder / old["file"]))  # type: ignore[union-attr]
            spec = old["type"]
        elif len(vectors):
            try:
                index, spec = faiss_index(vectors, options.index_type, options.nprobe)
            except ValueError as e:  # too few vectors for the IVF: the chunks are kept for another try
                raise ValueError(f"{e} (the embeddings are kept: rerun with --resume and another --index_type)") from e
        else:
            continue
        new = np.asarray(vectors[len(vectors) - len(vector_ids):], dtype=np.float32)
        for start in range(0, len(new), 65536):  # bounded memory: the vectors are float32 here, not dtype
            index.add_with_ids(new[start : start + 65536], vector_ids[start : start + 65536])
        faiss.write_index(index, str(folder / INDEXES[modality]))
        ivf = faiss.try_extract_index_ivf(index)
        indexes[modality] = {"file": INDEXES[modality], "type": spec, "ntotal": int(index.ntotal),
                             "nprobe": int(ivf.nprobe) if ivf is not None else None}  # fmt: skip

    if base is not None:
        shutil.copyfile(base.folder / METADATA, folder / METADATA)
    write_metadata(folder / METADATA, ids, merged["items"], caption_key, len(base.text_ids) if base is not None else 0)
    build = {
        "command": job.command, "data": job.data, "split": job.split, "image_key": job.image_key,
        "caption_key": caption_key, "ids": [int(offset), int(offset + n - 1)] if n else [], "items": n,
        "texts": len(text_ids), "skipped": skipped, "batch_size": job.batch_size, "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "options": {k: v for k, v in asdict(options).items() if v},
    }  # fmt: skip
    previous = base.manifest if base is not None else None
    counts = Counter(previous["skipped"]) if previous else Counter()
    counts.update(skipped)
    per_item = int(np.bincount(merged["text_owner"]).max(initial=0))
    model_entry = {"spec": job.model, "weights_hash": job.weights, "type": type(model).__name__, "seed": job.seed,
                   "act": job.act, "tokenizer": job.tokenizer, "int8": job.int8}  # fmt: skip
    manifest = {
        "format": FORMAT,
        "model": model_entry,
        "embedding": {"dim": int(merged["image"].shape[1]), "dtype": options.dtype, "normalized": True,
                      "metric": "inner_product"},
        "counts": {
            "items": offset + n,
            "texts": (len(base.text_ids) if base is not None else 0) + len(text_ids),
            "max_texts_per_item": max(per_item, previous["counts"]["max_texts_per_item"] if previous else 0),
        },
        "skipped": dict(sorted(counts.items())),
        "indexes": indexes,
        "builds": (previous["builds"] if previous else []) + [build],
        "versions": _versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: the folder is complete


def _append_npy(path: Path, old: np.ndarray | None, new: np.ndarray, dtype: np.dtype) -> None:
    """``old`` rows then ``new`` rows in one ``.npy`` (written through a memory map: bounded memory)."""
    n_old = len(old) if old is not None else 0
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n_old + len(new), *new.shape[1:]))
    for start in range(0, n_old, 65536):
        stop = min(start + 65536, n_old)
        out[start:stop] = old[start:stop]  # type: ignore[index]
    out[n_old:] = new
    out.flush()
    del out


def write_metadata(path: Path, ids: np.ndarray, items: list[dict[str, Any]], caption_key: str, text_row: int) -> None:
    """``items`` (one row per id: every metadata column, ``caption_key`` = its first caption) and
    ``texts`` (one row per text embedding: the item's id and the caption) in SQLite."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY)")
        db.execute("CREATE TABLE IF NOT EXISTS texts (row INTEGER PRIMARY KEY, id INTEGER NOT NULL, caption TEXT)")
        db.execute("CREATE INDEX IF NOT EXISTS texts_id ON texts (id)")
        rows = [_row(item, caption_key) for item in items]
        have = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        columns = list(dict.fromkeys(c for row in rows for c in row))
        for column in columns:
            if column not in have:
                db.execute(f"ALTER TABLE items ADD COLUMN {_quote(column)}")
        names = ", ".join(_quote(c) for c in ["id", *columns])
        marks = ", ".join("?" * (len(columns) + 1))
        db.executemany(f"INSERT INTO items ({names}) VALUES ({marks})",
                       ([int(i), *(row.get(c) for c in columns)] for i, row in zip(ids, rows)))  # fmt: skip
        texts = ((text_row + j, int(i), c) for j, (i, c) in enumerate(
            (i, c) for i, item in zip(ids, items) for c in item["captions"]))  # fmt: skip
        db.executemany("INSERT INTO texts (row, id, caption) VALUES (?, ?, ?)", texts)


def _row(item: dict[str, Any], caption_key: str) -> dict[str, Any]:
    # "id" is the index's own column: a metadata column of that name is kept as "id_"
    row = {("id_" if k == "id" else k): _sql_value(v) for k, v in item["meta"].items()}
    if item["captions"]:
        row[caption_key] = item["captions"][0]
    return row


def _sql_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _versions() -> dict[str, str]:
    import lightning

    import mmlm

    return {"mmlm": mmlm.__version__, "torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}  # fmt: skip


class Stopped(BaseException):
    """SIGTERM or SIGINT stopped a build or add; its chunks are kept for ``--resume``. A BaseException,
    as KeyboardInterrupt is, so that nothing on the way handles it as an error."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise ``Stopped`` while the block runs (Lightning only logs a SIGTERM in predict);
    the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _launching_process() -> bool:
    """True in the process the user started (global rank 0), False in the ranks Lightning or torchrun start."""
    return all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


# ------------------------------------------------------------------------------ build / add


def run_job(
    job: Job, options: Options, out: Path, model: nn.Module, items: Collection, collate: CollateItems,
    resume: bool, base: Index | None = None, overwrite: bool = False,
) -> Path | None:  # fmt: skip
    """Embed on every rank, merge on rank 0; returns ``out`` on rank 0, None on the others.

    The launching process holds the lock of ``out`` throughout; SIGTERM or SIGINT raise ``Stopped``."""
    work = Work(out)
    work.check(job, resume)
    with ExitStack() as stack:
        if _launching_process():
            stack.enter_context(outputs.claim(out))
        stack.enter_context(stop_on_signals())
        try:
            return _run(work, job, options, out, model, items, collate, resume, base, overwrite)
        except Stopped as e:
            chunks = len(list(work.chunks.glob("*.npz")))
            raise Stopped(e.signum, f"{e}: {chunks} chunks are kept in {work.root}; rerun with --resume to continue "
                                    "from them") from None  # fmt: skip


def _run(
    work: Work, job: Job, options: Options, out: Path, model: nn.Module, items: Collection, collate: CollateItems,
    resume: bool, base: Index | None, overwrite: bool,
) -> Path | None:  # fmt: skip
    started = time.perf_counter()
    data = ShareData(items, work, job, resume, collate, options.num_workers)
    distributed = options.devices * options.num_nodes > 1
    trainer = L.Trainer(
        accelerator=options.accelerator, devices=options.devices, num_nodes=options.num_nodes,
        strategy="ddp" if distributed else "auto", precision=options.precision,  # type: ignore[arg-type]
        callbacks=[ChunkWriter(work, options.chunk_size), ItemProgress()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.predict(Embedder(model), datamodule=data, return_predictions=False)
    # here, not in a predict hook: Lightning runs no hook of a rank whose share is empty
    counts = {"counts": dict(data.stats.counts), "good": data.stats.good}
    (work.counts / f"{data.run}-r{trainer.global_rank:04d}.json").write_text(json.dumps(counts))
    trainer.strategy.barrier("mmlm-index-chunks-written")
    if not trainer.is_global_zero:
        return None
    merged, skipped = merge(work, data.run)
    write_index(work.index, merged, skipped, job, options, base, items.caption_key, model,
                time.perf_counter() - started)  # fmt: skip
    outputs.publish(work.index, out, "index", overwrite)
    shutil.rmtree(work.root)  # the lock file with it: released when run_job ends
    return out


def build(
    model: str, data: str, out: Path, *, split: str = "test", image_key: str = "filepath",
    caption_key: str | None = None, tokenizer: str | None = None, act: str | None = None, seed: int = 0,
    batch_size: int = 64, resume: bool = False, overwrite: bool = False, int8: bool = False, **options: Any,
) -> Path | None:  # fmt: skip
    """A new index of ``data`` embedded with ``model`` in ``out`` (``mmlm index build``; see there)."""
    opts = Options(**options)
    _check_sizes(batch_size, opts)
    _check_int8(int8, opts)
    out = Path(out)
    outputs.check(out, "index", overwrite, hint=f", or append with `mmlm index add {out} DATA`")  # before the work
    loaded = load(model, tokenizer=tokenizer, act=act, seed=seed, int8=int8, image_text=USE)
    items = collection(data, loaded.transform, split, image_key, caption_key)
    check_index_type(opts.index_type, loaded.model.cfg.embed_dim, len(items) if items.shards is None else None)
    spec, tokenizer = _findable(model), _findable(tokenizer)  # `index add` and the server find them from any folder
    job = Job("build", spec, loaded.weights_hash, items.spec, split, image_key, caption_key, tokenizer, act, seed,
              batch_size, int8=int8)  # fmt: skip
    collate = CollateItems(loaded.require_tokenizer())
    return run_job(job, opts, out, loaded.model, items, collate, resume, overwrite=overwrite)


def add(
    index: Path, data: str, *, model: str | None = None, split: str = "test", image_key: str = "filepath",
    caption_key: str | None = None, batch_size: int = 64, resume: bool = False, **options: Any,
) -> Path | None:  # fmt: skip
    """Append ``data`` to the index in ``index`` with the model it was built with (``mmlm index add``)."""
    base = Index.open(index)
    outputs.check(index, "index", overwrite=True)  # it is replaced by itself plus the new items: only if all mmlm's
    built = base.manifest["model"]
    opts = Options(**options, dtype=base.manifest["embedding"]["dtype"])
    int8 = bool(built.get("int8", False))  # embedded as the index was
    _check_sizes(batch_size, opts)
    _check_int8(int8, opts)
    loaded = built_with(built, index, model)
    items = collection(data, loaded.transform, split, image_key, caption_key)
    manifest_hash = hashlib.sha256((Path(index) / MANIFEST).read_bytes()).hexdigest()
    job = Job("add", built["spec"], built["weights_hash"], items.spec, split, image_key, caption_key,
              built["tokenizer"], built["act"], built["seed"], batch_size, manifest_hash, int8)  # fmt: skip
    # the index is replaced by itself plus the new items
    collate = CollateItems(loaded.require_tokenizer())
    return run_job(job, opts, Path(index), loaded.model, items, collate, resume, base, overwrite=True)


def _findable(spec: str | None) -> str | None:
    """A model or tokenizer as the manifest records it: a local path made absolute, a name as it is."""
    if spec is None or spec in PRESETS or not resolve(spec).exists():
        return spec
    return str(resolve(spec).resolve())


def _check_int8(int8: bool, options: Options) -> None:
    """int8 Linear layers run on the CPU: ``auto`` becomes ``cpu``, any other accelerator is refused."""
    if not int8:
        return
    if options.accelerator not in ("auto", "cpu"):
        raise ValueError(f"--accelerator {options.accelerator}: int8 embeds on the CPU; drop --int8 or the accelerator")
    if options.precision != "32-true":
        raise ValueError(f"--precision {options.precision}: an int8 model computes in its own precision; drop one")
    options.accelerator = "cpu"


def _check_sizes(batch_size: int, options: Options) -> None:
    for name, value in (("batch_size", batch_size), ("chunk_size", options.chunk_size), ("devices", options.devices),
                        ("num_nodes", options.num_nodes)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name}={value}: give a number >= 1")
    if options.num_workers < 0:
        raise ValueError(f"num_workers={options.num_workers}: give 0 (read in the main process) or more")
