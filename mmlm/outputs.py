"""Where mmlm writes: prove a target is ours, claim it, publish it. Every writer goes through here.

The rule, the same for every command and function that writes (``index build`` / ``add``, ``convert``,
``quantize``, ``prune``, ``tokenizer train``, ``mmlm.save``, ``mmlm.export.export``, ``explain --out``,
``zeroshot --output`` / ``--confusion_matrix``, ``eval-retrieval --output``):

- **A folder** ``NAME`` is written into ``.NAME.partial/out`` beside it, under a lock, then renamed into
  place; a killed writer leaves no ``NAME`` or the previous complete one. ``NAME`` may be absent or an
  empty folder. With ``overwrite`` it may also be an mmlm output *of the same kind* (its marker
  ``.mmlm-output.json``, or for indexes and mmlm models written before markers existed their manifest /
  config, says so, and it holds no file the marker does not list); it is replaced as a whole, and the
  old one is removed only once the new one is in place. Anything else is refused in one line: a folder
  holding files mmlm did not write, or an mmlm output of another kind. Nothing a user owns is deleted.
  An index already in place is not renamed but gets a new version swapped in inside it
  (``mmlm.retrieval.versions``), under the same checks; its marker lists the files of every version.
- **A file** is refused if it exists, unless ``overwrite``; it is written under a temporary name and
  renamed, so nobody sees half a file (and without ``overwrite`` a file that appears meanwhile is kept).
- **The lock** is an OS lock (``fcntl.flock``) on ``.NAME.partial/.lock``: a second writer of ``NAME`` is
  refused while the first runs, and the lock of a killed writer dies with its process, so ``--resume``
  (or a fresh run) is never blocked by a stale lock file.

The refusals are ``FileExistsError`` naming the path: ``mmlm``'s CLI prints them as one line, exit 2.
Only the standard library is imported here.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

MARKER = ".mmlm-output.json"  # {"kind": ..., "files": [...]}: what mmlm wrote into a folder
MARKER_TMP = ".mmlm-output.json.tmp"  # the next marker, before it is renamed over MARKER (mmlm's own too)
LOCK = ".lock"  # inside .NAME.partial
KINDS = {  # kind -> what the messages call it
    "index": "an mmlm index",
    "mmlm": "an mmlm model",
    "hf": "a transformers folder",
    "open_clip": "an open_clip folder",
    "timm": "a timm folder",
    "sentence_transformers": "a sentence-transformers folder",
    "onnx": "an ONNX folder",
    "tokenizer": "a tokenizer folder",
}
# folders written before markers existed, recognised by the file that says what they are: that file, its
# "format", the kind, and the file names such a folder holds (anything else in it is the user's)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt")  # fmt: skip
LEGACY = (
    ("manifest.json", "mmlm-index/1", "index", ("manifest.json", "metadata.sqlite", "*.npy", "*.index")),
    ("config.json", "mmlm", "mmlm", ("config.json", "model.safetensors", *_TOKENIZER_FILES)),
)


# ------------------------------------------------------------------------------ prove


def kind_of(folder: Path) -> str | None:
    """The kind of mmlm output ``folder`` is, or None when nothing in it says it is one."""
    marker = _read_json(folder / MARKER)
    if isinstance(marker, dict) and marker.get("kind") in KINDS:
        return marker["kind"]
    return next((kind for name, fmt, kind, _ in LEGACY if _format(folder / name) == fmt), None)


def foreign_file(folder: Path) -> str | None:
    """The first file in ``folder`` (an mmlm output) that mmlm did not write there, or None."""
    marker = _read_json(folder / MARKER)
    if isinstance(marker, dict) and isinstance(marker.get("files"), list):
        listed = {*marker["files"], MARKER, MARKER_TMP}
        ours = listed.__contains__
    else:
        patterns = next((p for name, fmt, _, p in LEGACY if _format(folder / name) == fmt), ())
        ours = lambda rel: "/" not in rel and any(fnmatch(rel, p) for p in patterns)  # noqa: E731
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not (path.is_dir() and not path.is_symlink()) and not ours(rel):
            return rel
    return None


def check(out: str | Path, kind: str, overwrite: bool = False, hint: str = "") -> None:
    """Raise (one line, naming ``out``) unless ``kind`` may be written to the folder ``out`` (see the module)."""
    out = Path(out)
    what = KINDS[kind]
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: give a folder to write {what} into")
    if not any(out.iterdir()):
        return
    found = kind_of(out)
    if found is None:
        raise FileExistsError(f"{out} already exists and holds files mmlm did not write: give a new or empty folder "
                              f"(--overwrite replaces only {what}, never other files)")  # fmt: skip
    if found != kind:
        raise FileExistsError(f"{out} already exists and is {KINDS[found]}, not {what}: give another folder "
                              f"(--overwrite replaces only {what})")  # fmt: skip
    foreign = foreign_file(out)
    if foreign is not None:
        raise FileExistsError(f"{out} already exists and holds {foreign}, which mmlm did not write: move it away "
                              "or give another folder")  # fmt: skip
    if not overwrite:
        raise FileExistsError(f"{out} already exists ({what}): give a new folder, or pass --overwrite "
                              f"(overwrite=True) to replace it{hint}")  # fmt: skip


def check_file(path: str | Path, overwrite: bool = False) -> None:
    """Raise (one line) unless the file ``path`` may be written: absent, or ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: name a file to write")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: give a new file name, or pass --overwrite to replace it")


# ------------------------------------------------------------------------------ claim


def partial(out: str | Path) -> Path:
    """``.NAME.partial`` beside ``out``: where ``out`` is written before it is published."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextmanager
def claim(out: str | Path) -> Iterator[Path]:
    """Hold the lock of ``out`` (on ``.NAME.partial/.lock``, created if absent) while the block runs;
    yields ``.NAME.partial``. Another holder, alive, is refused in one line."""
    out = Path(out)
    root = partial(out)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / LOCK).exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} holds files mmlm did not write: move it away to write {out}")
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.stat(root / LOCK).st_ino == os.fstat(fd).st_ino  # not a lock file its holder just removed
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            pid = (root / LOCK).read_text().strip() if (root / LOCK).is_file() else "?"
            raise FileExistsError(f"{out} is being written by another mmlm command (pid {pid or '?'}): wait for it "
                                  "to finish, or give another folder")  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield root
    finally:
        os.close(fd)  # releases the lock


def clear(root: Path) -> None:
    """Empty a claimed ``.NAME.partial`` of what a killed writer left, all but the lock file."""
    for path in root.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ------------------------------------------------------------------------------ publish


def mark(folder: Path, kind: str, adding: Iterable[str] = ()) -> None:
    """Write the marker: ``folder`` is an mmlm output of ``kind`` holding exactly the files it holds now,
    and the files ``adding`` names (relative paths about to be moved in: listed first, so that a writer
    killed in between leaves no file the marker does not list). Renamed over the old marker, synced:
    a reader finds one marker or the other, whole."""
    ours = (MARKER, MARKER_TMP)
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() and p.name not in ours}
    tmp = folder / MARKER_TMP
    with open(tmp, "w") as f:
        f.write(json.dumps({"kind": kind, "files": sorted(files | set(adding))}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)


def publish(src: Path, out: Path, kind: str, overwrite: bool = False) -> None:
    """Mark ``src`` and rename it to ``out``; a previous ``out`` (checked again: it may have changed
    while the output was written) is moved aside to ``.NAME.old`` first and removed after."""
    check(out, kind, overwrite)
    mark(src, kind)
    if not out.exists() or not any(out.iterdir()):
        os.replace(src, out)  # an empty folder is replaced by the rename itself
        return
    old = out.parent / f".{out.name}.old"
    if old.exists():  # left by a publish that was killed between its renames
        if old.is_dir() and kind_of(old) is not None and foreign_file(old) is None:
            shutil.rmtree(old)
        else:
            raise FileExistsError(f"{old} is in the way and mmlm did not write it: move it away to replace {out}")
    os.rename(out, old)
    os.rename(src, out)
    shutil.rmtree(old)


@contextmanager
def writing(out: str | Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Check, claim, and on success publish the folder ``out``; yields the folder to write the files into.

    ::

        with outputs.writing(out, "mmlm", overwrite) as folder:
            save_files(folder)

    On an error nothing of ``out`` changes and the staging folder is removed.
    """
    out = Path(out)
    check(out, kind, overwrite)
    with claim(out) as root:
        clear(root)
        folder = root / "out"
        folder.mkdir()
        try:
            yield folder
            publish(folder, out, kind, overwrite)
        finally:
            shutil.rmtree(root)  # the lock file with it: it is released when the block ends


def write_file(path: str | Path, data: bytes | str, overwrite: bool = False) -> Path:
    """Write ``data`` to the file ``path`` (refused if it exists, unless ``overwrite``), all or nothing."""
    path = Path(path)
    check_file(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile: never replaces one
    except FileExistsError:
        check_file(path, overwrite)  # it appeared meanwhile: the same one line
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _format(path: Path) -> object:
    found = _read_json(path)
    return found.get("format") if isinstance(found, dict) else None
