"""Writing one version of an index: the merged chunks (``mmlm.retrieval.merge``: rows sorted by key, ids =
their ranks) read one at a time into the embeddings and the metadata, then the FAISS indexes and, last, the
manifest, into one folder; an ``add`` copies the base version's rows first, so the folder is a whole index by
itself (``mmlm.retrieval.index``). Memory: one chunk, never every embedding.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import sys
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

from mmlm.retrieval.index import (
    EMBEDDINGS,
    FORMAT,
    MANIFEST,
    METADATA,
    MODALITIES,
    TEXT_IDS,
    Index,
)
from mmlm.retrieval.merge import Merged
from mmlm.retrieval.ondisk import write_faiss
from mmlm.retrieval.options import Job, Options


def write_index(
    folder: Path, merged: Merged | dict[str, Any], skipped: dict[str, int], job: Job, options: Options, base: Index | None,
    caption_key: str, model: nn.Module, seconds: float, shards: Path | None = None, world: int = 1,
) -> None:  # fmt: skip
    """``folder``: the base index (if adding) plus the merged items, ids continuing the base's. ``merged``: the
    chunks of a build (``merge``), or rows already merged in memory (a dict of ``Merged.held``'s arguments: the
    vectors of a benchmark or a test). ``shards``: where an on-disk IVF's shards are written and kept for a
    resume (default: beside ``folder``); ``world`` processes write them (the others in
    ``ondisk.help_with_shards``)."""
    if isinstance(merged, dict):
        merged = Merged.held(**merged)
    folder.mkdir(parents=True)
    offset = len(base) if base is not None else 0
    n = merged.n
    ids = np.arange(offset, offset + n, dtype=np.int64)
    text_ids = ids[merged.text_owner]
    write_rows(folder, merged, base, np.dtype(options.dtype), caption_key)
    old_text_ids = base.text_ids if base is not None else np.zeros(0, np.int64)
    with NpyWriter(folder / TEXT_IDS, (len(old_text_ids) + len(text_ids),), np.dtype(np.int64)) as out:
        out.copy(old_text_ids)
        out.write(len(old_text_ids) + np.arange(len(text_ids)), text_ids)

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

    build = {
        "command": job.command, "job": job.id(), "data": job.data, "split": job.split, "image_key": job.image_key,
        "caption_key": caption_key, "ids": [int(offset), int(offset + n - 1)] if n else [], "items": n,
        "texts": len(text_ids), "skipped": skipped, "batch_size": job.batch_size, "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "options": {k: v for k, v in asdict(options).items() if v},
    }  # fmt: skip
    previous = base.manifest if base is not None else None
    counts = Counter(previous["skipped"]) if previous else Counter()
    counts.update(skipped)
    per_item = int(np.bincount(merged.text_owner).max(initial=0))
    model_entry = {"spec": job.model, "weights_hash": job.weights, "type": type(model).__name__, "seed": job.seed,
                   "act": job.act, "tokenizer": job.tokenizer, "int8": job.int8}  # fmt: skip
    manifest = {
        "format": FORMAT,
        "model": model_entry,
        "embedding": {"dim": merged.dim, "dtype": options.dtype, "normalized": True, "metric": "inner_product"},
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


def write_rows(folder: Path, merged: Merged, base: Index | None, dtype: np.dtype, caption_key: str) -> None:
    """The embeddings and the metadata of ``folder``: the base's rows first (copied in blocks), then each part of
    ``merged`` in one pass, its rows written where they go (memory: one part)."""
    old = {m: base.embeddings(m) if base is not None else np.zeros((0, merged.dim), dtype) for m in MODALITIES}
    n_texts = len(merged.text_owner)
    if base is not None:
        shutil.copyfile(base.files / METADATA, folder / METADATA)
    with (
        NpyWriter(folder / EMBEDDINGS["image"], (len(old["image"]) + merged.n, merged.dim), dtype) as images,
        NpyWriter(folder / EMBEDDINGS["text"], (len(old["text"]) + n_texts, merged.dim), dtype) as texts,
        Metadata(folder / METADATA, caption_key) as metadata,
    ):  # fmt: skip
        images.copy(old["image"])
        texts.copy(old["text"])
        offset, text_offset = len(base) if base is not None else 0, len(old["text"])
        for part in merged.parts():
            images.write(len(old["image"]) + part.rows, part.image)
            texts.write(text_offset + part.text_rows, part.text)
            # an item's first text row: texts are grouped by item, in item order
            first_text = text_offset + np.searchsorted(merged.text_owner, part.rows)
            metadata.add(offset + part.rows, part.items, first_text)


class NpyWriter:
    """A ``.npy`` file of ``shape`` written row by row, at any rows, through a file handle: a memory map would
    keep every page it wrote resident until closed (a whole index's embeddings, by the end). Holds nothing
    but the rows of one ``write`` (in the file's dtype) and the file's bytes are what ``np.save`` writes."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.file = open(path, "wb+")  # noqa: SIM115 (closed by __exit__)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.file, header)
        self.file.flush()
        self.start, self.dtype = self.file.tell(), dtype
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
        os.ftruncate(self.file.fileno(), self.start + shape[0] * self.row_bytes)

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def copy(self, rows: np.ndarray, block: int = 65536) -> None:
        """``rows`` (a base index's map) into the first rows, a block at a time."""
        for start in range(0, len(rows), block):
            self._put(start, rows[start : start + block])

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """``values[j]`` into row ``rows[j]``: sorted by row, each run of consecutive rows in one write (a
        2-rank build's chunk holds every other row: one write per row, about 5 us)."""
        if not len(rows):
            return
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
            self._put(int(rows[a]), values[a:b])

    def _put(self, row: int, values: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(values, dtype=self.dtype).reshape(-1).view(np.uint8))
        at = self.start + row * self.row_bytes
        while data:  # a write may take fewer bytes than it was given
            done = os.pwrite(self.file.fileno(), data, at)
            data, at = data[done:], at + done


class Metadata:
    """The new items' rows in SQLite (``items``: one per id, every metadata column, ``caption_key`` = the item's
    first caption; ``texts``: one per text embedding, its item's id and caption), added a part at a time in any
    id order: staged in a scratch database beside ``path``, then copied into ``path``'s tables in id order, the
    columns in the order of their first appearance by id. So the rows, their order and the columns are what
    writing every item at once in id order gives, with memory bounded by a part."""

    def __init__(self, path: Path, caption_key: str) -> None:
        self.path, self.caption_key = path, caption_key
        self.scratch = path.with_name(path.name + ".staging")
        self.scratch.unlink(missing_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("ATTACH DATABASE ? AS staging", (str(self.scratch),))
        self.db.execute("PRAGMA staging.journal_mode = OFF")  # a scratch file: lost with the build if it fails
        self.db.execute("CREATE TABLE staging.items (id INTEGER PRIMARY KEY)")
        self.db.execute("CREATE TABLE staging.texts (row INTEGER PRIMARY KEY, id INTEGER NOT NULL, caption TEXT)")
        self.first: dict[str, tuple[int, int]] = {}  # column: (id, position) of its first appearance by id

    def __enter__(self) -> Metadata:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            self.db.close()
            self.scratch.unlink(missing_ok=True)

    def add(self, ids: np.ndarray, items: list[dict[str, Any]], first_text: np.ndarray) -> None:
        """``items`` under ``ids``; item j's captions in the text rows ``first_text[j]``, ``first_text[j] + 1``, ..."""
        rows = [_row(item, self.caption_key) for item in items]
        for i, row in zip(ids.tolist(), rows):
            for position, column in enumerate(row):
                if (i, position) < self.first.get(column, (sys.maxsize, 0)):
                    self.first[column] = (i, position)
        have = {r[1] for r in self.db.execute("PRAGMA staging.table_info(items)")}
        columns = list(dict.fromkeys(c for row in rows for c in row))
        for column in columns:
            if column not in have:
                self.db.execute(f"ALTER TABLE staging.items ADD COLUMN {_quote(column)}")
        names = ", ".join(_quote(c) for c in ["id", *columns])
        marks = ", ".join("?" * (len(columns) + 1))
        self.db.executemany(f"INSERT INTO staging.items ({names}) VALUES ({marks})",
                            ([i, *(row.get(c) for c in columns)] for i, row in zip(ids.tolist(), rows)))  # fmt: skip
        texts = ((first + j, i, c) for i, first, item in zip(ids.tolist(), first_text.tolist(), items)
                 for j, c in enumerate(item["captions"]))  # fmt: skip
        self.db.executemany("INSERT INTO staging.texts (row, id, caption) VALUES (?, ?, ?)", texts)

    def _finish(self) -> None:
        db = self.db
        db.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY)")
        db.execute("CREATE TABLE IF NOT EXISTS texts (row INTEGER PRIMARY KEY, id INTEGER NOT NULL, caption TEXT)")
        db.execute("CREATE INDEX IF NOT EXISTS texts_id ON texts (id)")
        columns = sorted(self.first, key=self.first.__getitem__)
        have = {r[1] for r in db.execute("PRAGMA main.table_info(items)")}
        for column in columns:
            if column not in have:
                db.execute(f"ALTER TABLE main.items ADD COLUMN {_quote(column)}")
        names = ", ".join(_quote(c) for c in ["id", *columns])
        db.execute(f"INSERT INTO main.items ({names}) SELECT {names} FROM staging.items ORDER BY id")
        db.execute("INSERT INTO main.texts (row, id, caption) SELECT row, id, caption FROM staging.texts ORDER BY row")
        db.commit()
        db.execute("DETACH DATABASE staging")


def write_metadata(path: Path, ids: np.ndarray, items: list[dict[str, Any]], caption_key: str, text_row: int) -> None:
    """``items`` under ``ids`` (in id order), their captions from text row ``text_row`` on (see ``Metadata``)."""
    counts = np.array([len(item["captions"]) for item in items], dtype=np.int64)
    with Metadata(path, caption_key) as metadata:
        metadata.add(np.asarray(ids), items, text_row + np.cumsum(counts) - counts)


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
