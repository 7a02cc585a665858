"""``mmlm index build`` / ``add``: embed a collection on one process or many, in chunks that survive a
kill, then merge them into a new version of the index and make it the index atomically.

::

    every rank (Lightning predict: ``embed``)             rank 0, once every rank is done
    ─────────────────────────────────────────             ─────────────────────────────────────────────────
    its share of the items not yet in a chunk  ──►  chunks  ──►  merge, write .DIR.partial/index (``write``)
    skip counts of the pass                    ──►  counts       make it DIR's current version (``versions``)

Everything is written into ``.DIR.partial`` beside ``DIR`` (``work``), under its lock (``mmlm.outputs``: a
second build or add of ``DIR`` is refused while one runs; a killed one's lock dies with it). A new ``DIR``
appears by a rename at the very end; an index already in ``DIR`` (``add``, ``build --overwrite``) gets the
new version swapped in beside the current one, so a killed job leaves the previous complete index or the
new one, never a folder that is not one, and a server that opened the previous one keeps answering.
SIGTERM stops a job as SIGINT does (``Stopped``), keeping its chunks. ``--resume`` embeds only the items no
chunk holds; the bad samples, which no chunk holds, are read again and counted in the pass that
completes, so the counts come out as an uninterrupted build's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from mmlm import outputs
from mmlm.config import PRESETS
from mmlm.factory import load
from mmlm.paths import resolve
from mmlm.retrieval import versions
from mmlm.retrieval.choose import check_index_type
from mmlm.retrieval.collection import CollateItems, Collection, collection
from mmlm.retrieval.embed import ChunkWriter, Embedder, ItemProgress, ShareData
from mmlm.retrieval.index import MANIFEST, Index, files_of
from mmlm.retrieval.merge import merge
from mmlm.retrieval.model import USE, built_with
from mmlm.retrieval.ondisk import beat_file, beating, help_with_shards
from mmlm.retrieval.options import BATCH_SIZE, IMAGE_KEY, SPLIT, Job, Options, check_int8, check_sizes
from mmlm.retrieval.work import Work
from mmlm.retrieval.write import write_index


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
            if base is not None and files_of(out) != base.files:  # swapped before this add took the lock
                raise FileExistsError(f"{out} changed since this add opened it (another add or build wrote a "
                                      "new version): run the add again")  # fmt: skip
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
    if not trainer.is_global_zero:  # helps rank 0 with an IVF's shards (on every node), then is done
        written = help_with_shards(work.shards, data.run, trainer.global_rank, trainer.world_size)
        if written:
            print(f"rank {trainer.global_rank} wrote {written} shards", file=sys.stderr)
        return None
    work.shards.mkdir(exist_ok=True)
    try:
        with beating(beat_file(work.shards, 0)):
            merged, skipped = merge(work, data.run)
            write_index(work.index, merged, skipped, job, options, base, items.caption_key, model,
                        time.perf_counter() - started, work.shards, trainer.world_size)  # fmt: skip
    finally:
        (work.shards / f"done-{data.run}").touch()  # the other ranks stop helping, whatever happened
    versions.publish(work.index, out, work.root, overwrite)
    shutil.rmtree(work.root)  # the lock file with it: released when run_job ends
    return out


def build_index(
    model: str, data: str, out: str | Path, *, split: str = SPLIT, image_key: str = IMAGE_KEY,
    caption_key: str | None = None, tokenizer: str | None = None, act: str | None = None, seed: int = 0,
    batch_size: int = BATCH_SIZE, resume: bool = False, overwrite: bool = False, int8: bool = False, **options: Any,
) -> Index | None:  # fmt: skip
    """A new index of ``data`` embedded with ``model`` in ``out`` (``mmlm index build``; see there), opened
    (the caller closes it); None on the ranks other than 0 of a multi-process build."""
    opts = Options(**options)
    check_sizes(batch_size, opts)
    check_int8(int8, opts)
    out = Path(out)
    outputs.check(out, "index", overwrite, hint=f", or append with `mmlm index add {out} DATA`")  # before the work
    loaded = load(model, tokenizer=tokenizer, act=act, seed=seed, int8=int8, image_text=USE)
    items = collection(data, loaded.transform, split, image_key, caption_key)
    check_index_type(opts.index_type, loaded.model.cfg.embed_dim, len(items) if items.shards is None else None)
    spec, tokenizer = _findable(model), _findable(tokenizer)  # `index add` and the server find them from any folder
    job = Job("build", spec, loaded.weights_hash, items.spec, split, image_key, caption_key, tokenizer, act, seed,
              batch_size, int8=int8)  # fmt: skip
    collate = CollateItems(loaded.require_tokenizer())
    folder = run_job(job, opts, out, loaded.model, items, collate, resume, overwrite=overwrite)
    return Index.open(folder) if folder is not None else None


def add_to_index(
    index: str | Path, data: str, *, model: str | None = None, split: str = SPLIT, image_key: str = IMAGE_KEY,
    caption_key: str | None = None, batch_size: int = BATCH_SIZE, resume: bool = False, **options: Any,
) -> Index | None:  # fmt: skip
    """Append ``data`` to the index in ``index`` with the model it was built with (``mmlm index add``): a
    new version holding the old items and the new, ids continuing; opened (the caller closes it), None on
    the ranks other than 0."""
    index = Path(index)
    base = Index.open(index)
    try:
        work = Work(index)
        if resume and _published(work, base):
            return _tidy(index, work)
        folder = _add(base, index, data, model, split, image_key, caption_key, batch_size, resume, options)
    finally:
        base.close()
    return Index.open(folder) if folder is not None else None


def _add(
    base: Index, index: Path, data: str, model: str | None, split: str, image_key: str, caption_key: str | None,
    batch_size: int, resume: bool, options: dict[str, Any],
) -> Path | None:  # fmt: skip
    outputs.check(index, "index", overwrite=True)  # a new version is written into it: only if all mmlm's
    built = base.manifest["model"]
    opts = Options(**options, dtype=base.manifest["embedding"]["dtype"])
    int8 = bool(built.get("int8", False))  # embedded as the index was
    check_sizes(batch_size, opts)
    check_int8(int8, opts)
    loaded = built_with(built, index, model)
    items = collection(data, loaded.transform, split, image_key, caption_key)
    manifest_hash = hashlib.sha256((base.files / MANIFEST).read_bytes()).hexdigest()
    job = Job("add", built["spec"], built["weights_hash"], items.spec, split, image_key, caption_key,
              built["tokenizer"], built["act"], built["seed"], batch_size, manifest_hash, int8)  # fmt: skip
    collate = CollateItems(loaded.require_tokenizer())
    return run_job(job, opts, index, loaded.model, items, collate, resume, base, overwrite=True)


def _published(work: Work, base: Index) -> bool:
    """Whether the add that left ``work`` was killed after its swap: its job is the index's last build."""
    found = work.job()
    if found is None or found.get("command") != "add":
        return False
    try:
        job = Job(**found)
    except TypeError:  # a job file of another mmlm version
        return False
    return base.manifest["builds"][-1].get("job") == job.id()


def _tidy(index: Path, work: Work) -> Index | None:
    """Finish an add killed after its swap: the items are in; remove what the swap left and the work folder."""
    if not _launching_process():
        return None
    with outputs.claim(index):
        versions.tidy(index)
        shutil.rmtree(work.root)  # the lock file with it: released when the block ends
    print(f"{work.root}: its add had already made the new version current; removed what it left", file=sys.stderr)
    return Index.open(index)


def _findable(spec: str | None) -> str | None:
    """A model or tokenizer as the manifest records it: a local path made absolute, a name as it is."""
    if spec is None or spec in PRESETS or not resolve(spec).exists():
        return spec
    return str(resolve(spec).resolve())
