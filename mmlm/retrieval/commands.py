"""``mmlm index build|add|sync|info``: typed signatures for the command line (jsonargparse reads them).

Only the standard library is imported here, so ``mmlm --help`` stays fast; the work is in
``mmlm.retrieval.build`` and ``mmlm.retrieval.index``, the defaults in ``mmlm.retrieval.options``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from mmlm.retrieval.options import BATCH_SIZE, IMAGE_KEY, SPLIT, Options


def index_build(
    model: str,
    data: str,
    out: Path | None = None,
    index_type: str = Options.index_type,
    dtype: Literal["float32", "float16"] = Options.dtype,  # type: ignore[assignment]
    nprobe: int | None = Options.nprobe,
    max_index_memory: str | None = Options.max_index_memory,
    max_train_memory: str | None = Options.max_train_memory,
    query_ms: float = Options.query_ms,
    shard_size: int = Options.shard_size,
    batch_size: int = BATCH_SIZE,
    num_workers: int = Options.num_workers,
    chunk_size: int = Options.chunk_size,
    accelerator: str = Options.accelerator,
    devices: int = Options.devices,
    num_nodes: int = Options.num_nodes,
    precision: str = Options.precision,
    split: str = SPLIT,
    image_key: str = IMAGE_KEY,
    caption_key: str | None = None,
    tokenizer: str | None = None,
    act: Literal["gelu", "quick_gelu"] | None = None,
    seed: int = 0,
    int8: bool = False,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Embed an image(-text) collection with a CLIP into a folder: embeddings, metadata, FAISS indexes.

    Args:
        model: the CLIP: a preset name, an mmlm folder, a ``mmlm fit`` .ckpt, or any checkpoint
            ``mmlm.load_pretrained`` reads (a preset has random weights, seeded by ``seed``).
        data: a folder of images (captions not needed), a CSV / TSV / JSONL manifest (``filepath`` plus
            ``caption`` or ``title`` and any other columns; one row per caption), WebDataset shards
            (``data/{0..9}.tar``), ``digits`` or ``assets`` (the bundled photographs and captions).
        out: the index folder to write (it appears, complete, at the very end); new or empty, or an index
            with ``--overwrite``. A second build or add of it is refused while one runs.
        index_type: ``auto`` (exact below 1M vectors, IVF-PQ above; with ``--max_index_memory``, what fits)
            or any FAISS index_factory string (``Flat``, ``HNSW32``, ``IVF4096,PQ64``, ...), trained on a
            sample of the embeddings. IVF indexes are built in shards and keep their lists on disk
            (``image.ivfdata``, memory-mapped when served): the build's memory does not grow with N.
        dtype: of the stored embeddings (``float16`` halves the disk).
        nprobe: IVF clusters searched per query; default: tuned on 100 held-out queries, the most that
            answer within ``--query_ms`` (the choice and its recall@10 go into manifest.json).
        max_index_memory: the size the index may take (``4G``, ``800M``): with ``--index_type auto``,
            Flat, HNSW, IVF-Flat or IVF-PQ and its code size chosen as autofaiss chooses.
        max_train_memory: the memory the index's training sample may take (``2G``): it is cut to fit (100
            vectors per IVF cluster by default, never under 39), as autofaiss fits it to the memory available.
        query_ms: the query time (ms, one query, re-ranked) that the tuning of nprobe aims under.
        shard_size: vectors per shard of an IVF build (each shard is a copy of the trained index plus
            its vectors' codes: the build's memory is about one shard's).
        batch_size: images per forward pass.
        num_workers: DataLoader workers reading and decoding images.
        chunk_size: items per chunk file; a killed build loses at most one chunk per process.
        accelerator: ``auto``, ``cpu``, ``gpu``, ...
        devices: processes per node embedding in parallel (Lightning DDP predict).
        num_nodes: machines, for a multi-node launch (each runs this command; see the README).
        precision: Lightning precision of the forward passes (``bf16-mixed`` on a GPU).
        split: ``train`` or ``test`` for digits and CLIP_benchmark folders.
        image_key: manifest column with the image path (relative to the manifest).
        caption_key: manifest column with the caption, or shard json field; default: ``caption``, else ``title``.
        tokenizer: tokenizer name or folder; default: the checkpoint's, else the CLIP BPE.
        act: MLP activation of an OpenAI / OpenCLIP state dict when it cannot be detected.
        seed: seed of a preset's random weights.
        int8: embed with an int8 copy of the model (dynamic int8 Linear layers, CPU); the index records it,
            keeps the float model's weights hash, and ``mmlm index add`` embeds the same way.
        resume: continue an interrupted build of the same job from the chunks it wrote (SIGTERM and SIGINT
            stop a build keeping them, exit status 143 and 130).
        overwrite: replace the index in ``out``: the new one becomes its current version in one atomic step,
            the old one stays as the previous version; a folder that is not an mmlm index is never replaced.
    """
    from mmlm.errors import UsageError

    if out is None:
        raise UsageError("give the folder to write the index into: --out DIR")
    if nprobe is not None and nprobe < 1:  # FAISS would take it only after the whole embedding pass
        raise UsageError(f"--nprobe {nprobe}: give the IVF clusters searched per query, 1 or more")
    from mmlm.retrieval.build import build_index

    _stoppable(
        "index build", build_index, model, data, out, split=split, image_key=image_key, caption_key=caption_key,
        tokenizer=tokenizer, act=act, seed=seed, batch_size=batch_size, resume=resume, overwrite=overwrite, int8=int8,
        index_type=index_type, dtype=dtype, nprobe=nprobe, max_index_memory=max_index_memory,
        max_train_memory=max_train_memory, query_ms=query_ms,
        shard_size=shard_size, chunk_size=chunk_size, num_workers=num_workers,
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision,
    )  # fmt: skip


def index_add(
    index: Path,
    data: str,
    model: str | None = None,
    batch_size: int = BATCH_SIZE,
    num_workers: int = Options.num_workers,
    chunk_size: int = Options.chunk_size,
    accelerator: str = Options.accelerator,
    devices: int = Options.devices,
    num_nodes: int = Options.num_nodes,
    precision: str = Options.precision,
    split: str = SPLIT,
    image_key: str = IMAGE_KEY,
    caption_key: str | None = None,
    resume: bool = False,
) -> None:
    """Append a collection to an index, embedded with the model it was built with; ids continue.

    Args:
        index: the index folder (``mmlm index build --out``).
        data: what to add (the kinds ``mmlm index build`` takes).
        model: where the index's model is now, if not at the spec it was built from; refused unless
            its weights hash is the index's.
        batch_size: images per forward pass.
        num_workers: DataLoader workers reading and decoding images.
        chunk_size: items per chunk file; a killed run loses at most one chunk per process.
        accelerator: ``auto``, ``cpu``, ``gpu``, ...
        devices: processes per node embedding in parallel (Lightning DDP predict).
        num_nodes: machines, for a multi-node launch.
        precision: Lightning precision of the forward passes.
        split: ``train`` or ``test`` for digits and CLIP_benchmark folders.
        image_key: manifest column with the image path.
        caption_key: manifest column with the caption, or shard json field; default: ``caption``, else ``title``.
        resume: continue an interrupted add of the same data from the chunks it wrote (SIGTERM and SIGINT stop
            an add keeping them, exit status 143 and 130).
    """
    from mmlm.retrieval.build import add_to_index

    _stoppable(
        "index add", add_to_index, index, data, model=model, split=split, image_key=image_key, caption_key=caption_key,
        batch_size=batch_size, resume=resume, chunk_size=chunk_size, num_workers=num_workers, accelerator=accelerator,
        devices=devices, num_nodes=num_nodes, precision=precision,
    )  # fmt: skip


def index_sync(index: Path, model: str | None = None, batch_size: int = BATCH_SIZE, device: str = "cpu") -> None:
    """Bring an index up to date with the image folders it was built from, in a new version swapped in atomically.

    New and changed files are embedded, deleted ones leave the index, renamed or moved ones keep their vectors
    (found by content hash, sha256); a running ``mmlm serve`` serves the new version within a second or two.
    Only indexes of image folders can be synced (not of a manifest, shards or digits).

    Args:
        index: the index folder (``mmlm index build --out``).
        model: where the index's model is now, if not at the spec it was built from; refused unless
            its weights hash is the index's.
        batch_size: images per forward pass.
        device: where the new and changed images are embedded (``cpu``, ``cuda``, ...).
    """
    from mmlm.errors import UsageError, check_device
    from mmlm.retrieval.index import describe
    from mmlm.retrieval.sync import NotSyncable, sync_index

    if batch_size < 1:
        raise UsageError(f"--batch_size {batch_size}: give a number >= 1")
    check_device(device)
    try:
        synced, report = sync_index(index, model=model, batch_size=batch_size, device=device)
    except NotSyncable as e:
        raise UsageError(str(e)) from None
    counts = report["counts"]
    words = ", ".join(f"{counts[k]} {k}" for k in ("added", "changed", "removed", "renamed", "unchanged"))
    version = f"new version {report['version']}" if report["version"] else "already up to date, no new version"
    skipped = f", {counts['skipped']} skipped (not readable images)" if counts["skipped"] else ""
    print(f"mmlm index sync {index}: {words}; {counts['embedded']} embedded{skipped}; {version}")
    with synced:
        print(describe(synced.manifest, synced.folder))


def _stoppable(command: str, run: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``run``, then the index it wrote in words (rank 0; the others get None); stopped by a signal
    (``Stopped``), one line and the shell's exit status for it (128 + signal)."""
    from mmlm.retrieval.build import Stopped
    from mmlm.retrieval.index import describe

    try:
        index = run(*args, **kwargs)
    except Stopped as e:
        print(f"mmlm {command}: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    if index is not None:
        with index:
            print(describe(index.manifest, index.folder))


def index_info(index: Path) -> None:
    """Print what an index folder holds: model, counts, skipped samples, FAISS indexes, builds, versions.

    Args:
        index: the index folder.
    """
    from mmlm.retrieval.index import describe, read_manifest

    print(describe(read_manifest(index), index))
