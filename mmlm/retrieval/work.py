"""The work folder of an index job, ``.DIR.partial``: the job, the chunks every rank wrote, their skip
counts, and the merged index version before it is published. Chunks survive a kill, so ``--resume``
embeds only the items no chunk holds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mmlm import outputs
from mmlm.retrieval.options import Job


class Work:
    """``.DIR.partial``: the job, the chunks every rank wrote, their skip counts, the shards of an on-disk
    IVF (``ondisk``: kept by a resume, which checks they still match), the merged index."""

    def __init__(self, out: Path) -> None:
        self.root = outputs.partial(out)
        self.job_file, self.chunks, self.counts, self.index, self.shards = (
            self.root / "job.json", self.root / "chunks", self.root / "counts", self.root / "index",
            self.root / "shards",
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
            for path in self.root.iterdir():  # a merge or a publish that was cut short; its shards are kept
                if path not in (self.job_file, self.chunks, self.counts, self.shards) and path.name != outputs.LOCK:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
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
        return {int(k) for path in self.chunk_files() for k in read_chunk(path, "key")["key"]}

    def write_chunk(self, name: str, arrays: dict[str, np.ndarray], items: list[dict[str, Any]]) -> None:
        """One file, complete or absent: written under a temporary name, then renamed."""
        tmp = self.chunks / f"{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, items=np.frombuffer(json.dumps(items).encode(), dtype=np.uint8), **arrays)
        os.replace(tmp, self.chunks / f"{name}.npz")

    def chunk_files(self) -> list[Path]:
        """Every chunk, in name order (``RUN-rRANK-SEQ.npz``: ``run_of`` tells its embedding pass)."""
        return sorted(self.chunks.glob("*.npz"))


def run_of(chunk: Path) -> str:
    """The embedding pass that wrote ``chunk``."""
    return chunk.name.split("-")[0]


def read_chunk(chunk: Path, *names: str) -> dict[str, Any]:
    """The members ``names`` of ``chunk`` that it holds (``text`` and ``text_key`` only where it has captions),
    and nothing else: an ``.npz`` reads one member at a time, so the keys of a chunk are read without its
    embeddings. ``items`` (the items' metadata, stored as JSON bytes) comes back as the list it was."""
    with np.load(chunk) as z:
        found = {name: z[name] for name in names if name in z.files}
    if "items" in found:
        found["items"] = json.loads(found["items"].tobytes())
    return found


def chunk_dim(chunk: Path) -> int:
    """The width of ``chunk``'s image embeddings, from the header of its ``image`` member alone."""
    with zipfile.ZipFile(chunk) as z, z.open("image.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return int(shape[1])
