"""``mmlm index sync``: bring an index of image folders up to date with them, as a new version swapped in
atomically (``versions``), embedding only what is new or changed.

::

    each folder its builds read            the items of the current version (metadata: filepath, mtime, size, sha256)
    ───────────────────────────            ───────────────────────────────────────────────────────────────────────────
    same path, same mtime and size    ──►  unchanged: row kept
    same path, other mtime or size    ──►  hashed: same sha256 -> unchanged (a touch: recorded); else changed: embedded
    a path the index does not hold    ──►  hashed: the sha256 of an item whose path is gone -> renamed (its vector
                                           and metadata kept, the path updated); else added: embedded
    an item whose path is gone        ──►  removed (unless a new path took its sha256)

The new version holds each folder's items together (its builds' id range: kept items in their old order, then
its new ones by path), so ids are renumbered 0..n-1 where items left. An index built before files were
recorded has no mtime / size / sha256: its first sync hashes every file once, keeps the items whose path is
still there as they are, and records them. Only the embedding of the new and changed files costs model time:
the rows kept are copied, and the FAISS index (its training kept) is refilled with every vector.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmlm import outputs
from mmlm.data.skips import Skip, load_image
from mmlm.data.sources import find_shards, is_digits
from mmlm.paths import ASSETS, resolve
from mmlm.retrieval import versions
from mmlm.retrieval.collection import BUNDLED, file_record, image_files
from mmlm.retrieval.index import EMBEDDINGS, MANIFEST, METADATA, TEXT_IDS, Index, files_of
from mmlm.retrieval.model import built_with
from mmlm.retrieval.ondisk import refill
from mmlm.retrieval.options import BATCH_SIZE
from mmlm.retrieval.write import renumber_metadata, versions_of_libraries

COUNTS = ("added", "changed", "removed", "renamed", "unchanged", "embedded", "skipped", "hashed", "touched")
FILE_COLUMNS = ("filepath", "mtime", "size", "sha256")


class NotSyncable(ValueError):
    """The index holds data that is not an image folder: there is nothing to look at again."""


@dataclass
class Entry:
    """One item of the new version: its old id (None: new) and, if it is embedded anew, its file."""

    old: int | None
    meta: dict[str, Any]
    path: Path | None = None  # embedded from this file (added or changed)
    vector: np.ndarray | None = None


@dataclass
class Plan:
    """What a sync does, per folder (in the order of the builds that read them)."""

    roots: dict[Path, list[int]]  # folder -> the indices of the builds that read it
    entries: dict[Path, list[Entry]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    unrecorded: int = 0  # items without a file record: indexed before sync existed

    def todo(self) -> list[Entry]:
        return [e for entries in self.entries.values() for e in entries if e.path is not None]

    def changes(self) -> int:
        # a touch too: recorded, the next sync need not hash the file again (a copy that reset every mtime would
        # otherwise have every sync hash the whole folder)
        return sum(self.counts[k] for k in ("added", "changed", "removed", "renamed", "touched")) + self.unrecorded


def folders_of(manifest: dict[str, Any], folder: Path) -> dict[Path, list[int]]:
    """Each image folder the index's builds read -> those builds; NotSyncable naming the first that read other
    data (a manifest, shards, digits), since only a folder can be looked at again."""
    roots: dict[Path, list[int]] = defaultdict(list)
    for i, build in enumerate(manifest["builds"]):
        data = str(build["data"])
        path = ASSETS if data == BUNDLED else resolve(data)
        if is_digits(data) or data == BUNDLED or path.is_file() or find_shards(data, build.get("split") or "test"):
            raise NotSyncable(f"{folder}: its {build['command']} of {data} read a manifest, shards or digits, "
                              "not an image folder; only an index of image folders can be synced")  # fmt: skip
        if not path.is_dir():
            raise NotSyncable(f"{folder}: the folder its {build['command']} read, {data}, is gone; nothing to sync "
                              "it with (put the folder back, or rebuild the index)")  # fmt: skip
        roots[path.resolve()].append(i)
    return dict(roots)


def plan(base: Index, roots: dict[Path, list[int]]) -> Plan:
    """Compare each folder with the items the index holds of it (see the module docstring)."""
    out = Plan(roots)
    with closing(sqlite3.connect((base.files / METADATA).resolve().as_uri() + "?mode=ro", uri=True)) as db:
        have = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        columns = ", ".join(f'"{c}"' if c in have else "NULL" for c in FILE_COLUMNS)
        rows = {r[0]: r[1:] for r in db.execute(f"SELECT id, {columns} FROM items")}
    builds = base.manifest["builds"]
    gone: dict[str, list[int]] = defaultdict(list)  # sha256 -> old ids whose path is gone: what a rename takes
    held: dict[Path, dict[str, int]] = {}
    for root, numbers in roots.items():
        ids = sorted(
            i for n in numbers if builds[n]["ids"] for i in range(builds[n]["ids"][0], builds[n]["ids"][1] + 1)
        )
        held[root] = {rows[i][0]: i for i in ids if i in rows and isinstance(rows[i][0], str)}
    found = {root: image_files(root) for root in roots}
    for root in roots:
        for rel, i in held[root].items():
            if rel not in found[root] and rows[i][3] is not None:
                gone[rows[i][3]].append(i)
    for root in roots:
        entries: list[Entry] = []
        new: list[Entry] = []
        for rel in sorted(found[root], key=lambda rel: rel.split("/")):
            stat, i = found[root][rel], held[root].get(rel)
            if i is not None and rows[i][1:3] == (stat.st_mtime_ns, stat.st_size) and rows[i][3] is not None:
                entries.append(Entry(i, {"filepath": rel}))
                out.counts["unchanged"] += 1
                continue
            path = root / rel  # only now: a Path per file of a large folder costs more than its stat
            try:
                _, record = file_record(path)
            except OSError:  # went away since the listing: as if it had not been there
                continue
            out.counts["hashed"] += 1
            meta = {"filepath": rel, **record}
            if i is not None:
                if rows[i][3] is None:  # indexed before sync: no record to compare with; the item is taken as it is
                    out.unrecorded += 1
                    entries.append(Entry(i, meta))
                    out.counts["unchanged"] += 1
                elif rows[i][3] == record["sha256"]:  # touched, not changed: its new mtime is recorded
                    entries.append(Entry(i, meta))
                    out.counts["unchanged"] += 1
                    out.counts["touched"] += 1
                else:
                    entries.append(Entry(i, meta, path))
                    out.counts["changed"] += 1
            elif gone.get(record["sha256"]):
                old = gone[record["sha256"]].pop(0)
                new.append(Entry(old, meta))
                out.counts["renamed"] += 1
            else:
                new.append(Entry(None, meta, path))
                out.counts["added"] += 1
        out.entries[root] = entries + new
    kept = {e.old for entries in out.entries.values() for e in entries}
    out.counts["removed"] = len({i for root in roots for i in held[root].values()} - kept)
    return out


def embed(entries: list[Entry], model: torch.nn.Module, transform: Any, batch_size: int, device: str) -> Counter:
    """The image embedding of each entry's file (as ``index build`` computes it), in batches; the skip counts of
    files that are no longer good images (they leave the index)."""
    skipped: Counter = Counter()
    for start in range(0, len(entries), batch_size):
        batch, pixels = [], []
        for entry in entries[start : start + batch_size]:
            image = load_image(str(entry.path))
            if isinstance(image, Skip):
                skipped[image.reason] += 1
                continue
            batch.append(entry)
            pixels.append(transform(image))
        if not batch:
            continue
        with torch.inference_mode():
            vectors = model.encode_image(torch.stack(pixels).to(device)).float().cpu().numpy()
        for entry, vector in zip(batch, vectors):
            entry.vector = vector
    return skipped


def write_version(folder: Path, base: Index, work: Plan, seconds: float) -> dict[str, Any]:
    """The new version in ``folder``: the entries' rows (kept ones copied from ``base``), FAISS refilled, metadata
    and, last, the manifest, whose ``syncs`` records this sync's counts; returns that record."""
    folder.mkdir(parents=True)
    order = [
        (root, e) for root, entries in work.entries.items() for e in entries if e.path is None or e.vector is not None
    ]
    if not order:
        raise ValueError(f"{base.folder}: no image is left in {', '.join(map(str, work.roots))}; nothing to index")
    dtype = np.dtype(base.manifest["embedding"]["dtype"])
    stored = base.embeddings("image")
    image = np.lib.format.open_memmap(
        folder / EMBEDDINGS["image"], mode="w+", dtype=dtype, shape=(len(order), base.dim)
    )
    for start in range(0, len(order), 65536):  # bounded memory; the kept rows gathered by one fancy index each
        part = [e for _, e in order[start : start + 65536]]
        copied = np.asarray([e.vector is None for e in part])
        block = np.empty((len(part), base.dim), dtype=np.float32)
        if copied.any():
            block[copied] = stored[np.asarray([e.old for e in part if e.vector is None])]
        if not copied.all():
            block[~copied] = np.stack([e.vector for e in part if e.vector is not None])
        image[start : start + len(part)] = block
    image.flush()
    # captions of the items kept (folders have none; an index may mix in none of another kind, but stay exact)
    new_of = {e.old: new_id for new_id, (_, e) in enumerate(order) if e.old is not None}
    text_rows = np.flatnonzero(np.isin(base.text_ids, list(new_of))) if len(base.text_ids) else np.zeros(0, np.int64)
    text_ids = np.asarray([new_of[int(i)] for i in base.text_ids[text_rows]], dtype=np.int64)
    text_order = np.argsort(text_ids, kind="stable")
    text_rows, text_ids = text_rows[text_order], text_ids[text_order]
    texts = np.asarray(base.embeddings("text")[text_rows], dtype=dtype).reshape(len(text_rows), base.dim)
    np.save(folder / EMBEDDINGS["text"], texts)
    np.save(folder / TEXT_IDS, text_ids)

    indexes = {}
    for modality, entry in base.manifest["indexes"].items():  # an IVF keeps its training: the build's cells
        ids = np.arange(len(order), dtype=np.int64) if modality == "image" else text_ids
        indexes[modality] = refill(folder, modality, ids, entry, base.files)

    # kept rows move to their new ids inside SQLite; only the rows whose file columns changed are written
    kept = [(e.old, new_id) for new_id, (_, e) in enumerate(order) if e.old is not None]
    rows = [(new_id, e.meta) for new_id, (_, e) in enumerate(order) if e.old is None or len(e.meta) > 1]
    renumber_metadata(base.files / METADATA, folder / METADATA, kept, rows)

    manifest = json.loads(json.dumps(base.manifest))
    builds = manifest["builds"]
    first = 0
    for root, numbers in work.roots.items():
        n = sum(1 for r, _ in order if r == root)
        for j, number in enumerate(numbers):  # a folder's items are one id range: its first build's
            builds[number]["ids"] = [first, first + n - 1] if j == 0 and n else []
            builds[number]["items"] = n if j == 0 else 0
        first += n
    record = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 2),
              "data": [str(r) for r in work.roots], "counts": {k: int(work.counts[k]) for k in COUNTS},
              "unrecorded": work.unrecorded}  # fmt: skip
    manifest["counts"] = {"items": len(order), "texts": len(text_ids),
                          "max_texts_per_item": int(np.bincount(text_ids).max(initial=0))}  # fmt: skip
    manifest["indexes"] = indexes
    manifest["syncs"] = manifest.get("syncs", []) + [record]
    manifest["versions"] = versions_of_libraries()
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: the folder is complete
    return record


def sync_index(
    index: str | Path, *, model: str | None = None, batch_size: int = BATCH_SIZE, device: str = "cpu"
) -> tuple[Index, dict[str, Any]]:
    """Bring the index in ``index`` up to date with the image folders it was built from (``mmlm index sync``): a
    new version when anything changed, swapped in atomically; the index (opened: the caller closes it) and what
    the sync did (``counts``; ``version``: None when nothing changed)."""
    started = time.perf_counter()
    index = Path(index)
    with Index.open(index) as base:
        roots = folders_of(base.manifest, index)
        outputs.check(index, "index", overwrite=True)  # a new version is written into it: only if all mmlm's
        with outputs.claim(index) as root:
            if (root / "job.json").is_file():
                raise FileExistsError(f"{root} holds an interrupted build or add of {index}: finish it with "
                                      "--resume (or remove that folder) before a sync")  # fmt: skip
            if files_of(index) != base.files:
                raise FileExistsError(f"{index} changed since this sync opened it (another command wrote a new "
                                      "version): run the sync again")  # fmt: skip
            outputs.clear(root)  # what a killed sync left
            work = plan(base, roots)
            if work.unrecorded:
                print(f"{index}: {work.unrecorded} items have no mtime / size / sha256 (indexed before sync existed): "
                      "hashed every file once and recorded them; a rename of theirs is seen from the next sync on",
                      file=sys.stderr)  # fmt: skip
            todo = work.todo()
            if todo:
                loaded = built_with(base.manifest["model"], index, model, device)
                work.counts.update({f"skipped_{k}": v for k, v in embed(todo, loaded.model, loaded.transform,
                                                                         batch_size, device).items()})  # fmt: skip
                work.counts["skipped"] = sum(v for k, v in work.counts.items() if k.startswith("skipped_"))
                work.counts["embedded"] = sum(1 for e in todo if e.vector is not None)
                # a new file that is no good image was not added (a build skips it too): no new version for it
                work.counts["added"] -= sum(1 for e in todo if e.vector is None and e.old is None)
            report: dict[str, Any] = {"counts": {k: int(work.counts[k]) for k in COUNTS}, "version": None}
            if work.changes() == 0:
                versions.tidy(index)  # what a sync killed after its swap left
                shutil.rmtree(root)  # the lock file with it: released when the block ends
                return Index.open(index), report
            write_version(root / "index", base, work, time.perf_counter() - started)
            report["version"] = versions.publish(root / "index", index, root, overwrite=True)
            shutil.rmtree(root)
    return Index.open(index), report
