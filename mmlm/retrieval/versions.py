"""Making a new version of an index the index, atomically: the served folder is never absent or half
written, at any instant, whatever kills the writer.

::

    .DIR.partial/index/  (complete, every file fsync'd)                          DIR/
                │                                                                ├── CURRENT: v000002 ──► v000003
                │  1. the marker lists v000003's files (renamed over, synced)    ├── v000001/  removed (5.)
                └─ 2. renamed to DIR/v000003, DIR fsync'd ─────────────────────► ├── v000002/  kept: the previous
                   3. CURRENT written in .DIR.partial, fsync'd, os.replace'd ──► ├── v000003/  the index
                   4. DIR fsync'd                                                └── .mmlm-output.json
                   5. versions older than the previous removed, the marker rewritten

A kill before 3 leaves the previous version current (and at most an unnamed version folder, which the
next writer removes); a kill after 3 leaves the new one current. ``Index.open`` follows CURRENT; an
``Index`` opened before the swap keeps answering from the version it opened, which stays until the next
swap. A folder with no CURRENT (indexes written before versions existed: the files directly in DIR) gets
its first version folder the same way, and its flat files are removed once CURRENT names the new one.

The caller holds the lock of DIR (``mmlm.outputs.claim``); ``outputs.check`` has proved DIR is mmlm's own
index (its marker lists every file in it), and the marker keeps listing every file mmlm puts there.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmlm import outputs
from mmlm.retrieval.index import (
    CURRENT,
    EMBEDDINGS,
    INDEXES,
    MANIFEST,
    METADATA,
    TEXT_IDS,
    current_version,
    version_name,
    versions,
)

FLAT_FILES = (MANIFEST, METADATA, *EMBEDDINGS.values(), TEXT_IDS, *INDEXES.values())  # a flat index's files


def publish(staged: Path, out: Path, staging: Path, overwrite: bool = False) -> str:
    """Make the complete version folder ``staged`` (inside ``staging``, ``.DIR.partial``) the index in
    ``out``; the name of its version folder. A new (or empty) ``out`` appears by one rename, already in
    the versioned layout; an index already there gets the new version swapped in beside its current one."""
    outputs.check(out, "index", overwrite)  # again: DIR may have changed while the job ran
    if out.exists() and any(out.iterdir()):
        return _swap(staged, out, staging)
    root = staging / "new"
    root.mkdir()
    name = version_name(1)
    os.rename(staged, root / name)
    _point(root, name, staging)
    fsync_tree(root)
    outputs.publish(root, out, "index", overwrite)
    fsync_dir(out)
    fsync_dir(out.parent)
    return name


def _swap(staged: Path, out: Path, staging: Path) -> str:
    tidy(out)
    previous = current_version(out)  # None: the flat layout
    name = version_name(max(versions(out), default=0) + 1)
    fsync_tree(staged)
    outputs.mark(out, "index", adding=[CURRENT, *(f"{name}/{rel}" for rel in _files(staged))])  # a flat index had none
    os.rename(staged, out / name)
    fsync_dir(out)
    _point(out, name, staging)
    _remove_old(out, keep={name, previous})
    outputs.mark(out, "index")
    fsync_dir(out)
    return name


def tidy(out: Path) -> None:
    """Remove what a writer killed after step 1 left in ``out``: a version folder CURRENT never named,
    versions older than the previous one, the flat files of an index whose first swap was cut short, the
    files a marker still lists after they were removed."""
    current = current_version(out)
    keep = set()
    if current is not None:
        number = int(current[1:])
        older = [n for n in versions(out) if n < number]
        keep = {current, *([version_name(max(older))] if older else [])}
    _remove_old(out, keep)
    outputs.mark(out, "index")  # the marker again lists exactly what is there (and its temporary is gone)
    fsync_dir(out)


def _point(folder: Path, name: str, staging: Path) -> None:
    """CURRENT in ``folder`` names ``name``: written beside, in ``staging`` (a crash leaves no stray file
    in DIR), synced, then renamed over the old one, which is atomic; the folder synced after it."""
    tmp = staging / f"{CURRENT}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / CURRENT)
    fsync_dir(folder)


def _remove_old(out: Path, keep: set[str | None]) -> None:
    """Remove the version folders not in ``keep``, and the flat files once CURRENT exists."""
    for path in sorted(versions(out).values()):
        if path.name not in keep:
            _remove_tree(path)
    if current_version(out) is not None:
        for name in FLAT_FILES:
            if (out / name).is_file():
                (out / name).unlink()


def _remove_tree(folder: Path) -> None:
    """File by file, then the folders (deepest first): a kill part-way leaves files the marker lists."""
    paths = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in paths:
        if not path.is_dir() or path.is_symlink():
            path.unlink()
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
    folder.rmdir()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def fsync_tree(folder: Path) -> None:
    """Every file under ``folder`` and every folder (itself included) on disk, not only in the page cache:
    after a power loss a renamed-in version holds its bytes, not zero-length files."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """The folder's entries (a rename into it, a file created in it) on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
