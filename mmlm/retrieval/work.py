"""The work folder of an index job, ``.DIR.partial``: the job, the chunks every rank wrote, their skip
counts, and the merged index version before it is published. Chunks survive a kill, so ``--resume``
embeds only the items no chunk holds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
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
