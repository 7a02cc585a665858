"""Writing one version of an index: the chunks merged (rows sorted by key, ids = their ranks), then the
embeddings, the FAISS indexes, the metadata and, last, the manifest, into one folder; an ``add`` copies
the base version's rows first, so the folder is a whole index by itself (``mmlm.retrieval.index``).
"""

from __future__ import annotations

import json
import platform
import shutil
import sqlite3
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from mmlm.data.skips import NoGoodSamples
from mmlm.retrieval.index import (
    EMBEDDINGS,
    FORMAT,
    MANIFEST,
    METADATA,
    MODALITIES,
    TEXT_IDS,
    Index,
)
from mmlm.retrieval.ondisk import write_faiss
from mmlm.retrieval.options import Job, Options
from mmlm.retrieval.work import Work


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
    caption_key: str, model: nn.Module, seconds: float, shards: Path | None = None, world: int = 1,
) -> None:  # fmt: skip
    """``folder``: the base index (if adding) plus the merged items, ids continuing the base's. ``shards``:
    where an on-disk IVF's shards are written and kept for a resume (default: beside ``folder``); ``world``
    processes write them (the others in ``ondisk.help_with_shards``)."""
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
    own_shards = shards is None  # no job folder to keep them in for a resume: removed once merged
    shards = shards if shards is not None else folder.with_name(folder.name + ".shards")
    for modality, vector_ids in (("image", ids), ("text", text_ids)):
        old = base.manifest["indexes"].get(modality) if base is not None else None
        try:
            entry = write_faiss(folder, modality, vector_ids, options, old, base.files if base else None, shards,
                                world)  # fmt: skip
        except ValueError as e:  # too few vectors for the IVF: the chunks are kept for another try
            raise ValueError(f"{e} (the embeddings are kept: rerun with --resume and another --index_type)") from e
        if entry is not None:
            indexes[modality] = entry
    if own_shards:
        shutil.rmtree(shards, ignore_errors=True)

    if base is not None:
        shutil.copyfile(base.files / METADATA, folder / METADATA)
    write_metadata(folder / METADATA, ids, merged["items"], caption_key, len(base.text_ids) if base is not None else 0)
    build = {
        "command": job.command, "job": job.id(), "data": job.data, "split": job.split, "image_key": job.image_key,
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
        "versions": versions_of_libraries(),
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
    # closing: the connection is closed on any way out (``with`` on a connection only commits or rolls back)
    with closing(sqlite3.connect(path)) as db, db:
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


def renumber_metadata(old: Path, path: Path, kept: list[tuple[int, int]], rows: list[tuple[int, dict[str, Any]]]) -> None:
    """``path``: the metadata of ``old`` with only the ``kept`` items (old id, new id) under their new ids (their
    captions with them, caption rows renumbered in the new id order), then ``rows`` (new id, columns) updated or
    added. The rows are copied inside SQLite, not through Python: ``index sync`` of a large folder rewrites every
    id but changes few rows (10,000 items: 0.7 s through Python before, a few ms this way)."""
    shutil.copyfile(old, path)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TEMP TABLE kept (old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
        db.executemany("INSERT INTO kept VALUES (?, ?)", kept)
        db.execute("DELETE FROM items WHERE id NOT IN (SELECT old FROM kept)")
        # two passes through negative ids: a new id may be an old id still in use
        db.execute("UPDATE items SET id = -1 - (SELECT new FROM kept WHERE old = items.id)")
        db.execute("UPDATE items SET id = -1 - id")
        db.execute("CREATE TEMP TABLE captions AS SELECT k.new AS id, t.caption AS caption FROM texts t "
                   "JOIN kept k ON k.old = t.id ORDER BY k.new, t.row")  # fmt: skip
        db.execute("DELETE FROM texts")
        db.execute("INSERT INTO texts (row, id, caption) SELECT rowid - 1, id, caption FROM captions ORDER BY rowid")
        have = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        for column in dict.fromkeys(c for _, row in rows for c in row):
            if column not in have:
                db.execute(f"ALTER TABLE items ADD COLUMN {_quote(column)}")
        for i, row in rows:
            columns = [_quote(c) for c in row]
            values = [_sql_value(v) for v in row.values()]
            db.execute(f"INSERT INTO items (id, {', '.join(columns)}) VALUES (?{', ?' * len(columns)}) ON CONFLICT(id) "
                       f"DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in columns)}", [i, *values])  # fmt: skip


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


def versions_of_libraries() -> dict[str, str]:
    """The versions of the libraries that wrote an index (its manifest's ``versions``)."""
    import lightning

    import mmlm

    return {"mmlm": mmlm.__version__, "torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}  # fmt: skip
