"""The embedding pass of an index job, on one process or many (Lightning predict): each rank embeds its
share of the items no chunk holds yet and writes them as chunk files into the work folder.

::

    every rank (Lightning predict)
    ─────────────────────────────
    its share of the items not yet in a chunk  ──►  chunks/RUN-rRANK-SEQ.npz
    skip counts of the pass                    ──►  counts/RUN-rRANK.json
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch import nn
from tqdm.auto import tqdm

from mmlm.data.skips import SkippingDataLoader, SkipStats
from mmlm.retrieval.collection import CollateItems, Collection
from mmlm.retrieval.options import Job
from mmlm.retrieval.work import Work


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
