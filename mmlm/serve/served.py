"""What a server serves: each index under its name, with the ``Runtime`` that embeds its queries and the folders
its image files are in (``open_indexes``). Imports no torch: the torch runtime is loaded only when chosen."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmlm.data.images import IMG_EXTENSIONS
from mmlm.paths import ASSETS, resolve
from mmlm.retrieval.index import Index
from mmlm.retrieval.options import BUNDLED
from mmlm.serve.runtime.base import Runtime
from mmlm.serve.runtime.load import INDEX_SUFFIX, OnnxRuntime, onnx_for

if TYPE_CHECKING:
    from torch import nn

NAME = re.compile(r"[A-Za-z0-9._-]+")  # an index name is a URL path segment


@dataclass
class Served:
    """An index under its name, the runtime that embeds its queries, and where its image files are."""

    name: str
    index: Index
    runtime: Runtime
    roots: list[tuple[int, int, Path, str]]  # per build that read image files: first id, last id, folder, column
    lock: threading.Lock = field(default_factory=threading.Lock)  # one SQLite connection, one thread at a time

    @property
    def version(self) -> str | None:
        """The version folder served (``v000003``); None for an index in the flat layout."""
        return self.index.files.name if self.index.files != self.index.folder else None

    def metadata(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        with self.lock:
            return self.index.metadata(np.asarray(ids, dtype=np.int64))

    def has_image(self, item: int, meta: dict[str, Any]) -> bool:
        return any(first <= item <= last and isinstance(meta.get(key), str) for first, last, _, key in self.roots)

    def image_file(self, item: int, meta: dict[str, Any]) -> Path | None:
        """The item's image file, only if it lies inside the folder its build read (symlinks resolved)."""
        for first, last, root, key in self.roots:
            if first <= item <= last and isinstance(meta.get(key), str):
                path = (root / meta[key]).resolve()
                ok = path.is_relative_to(root) and path.suffix.lower() in IMG_EXTENSIONS and path.is_file()
                return path if ok else None
        return None


def data_root(data: str) -> Path | None:
    """The folder a build's image paths are relative to: the image folder it read, or its manifest's
    folder; None for data without image files (shards, digits) or no longer there."""
    path = ASSETS if data == BUNDLED else resolve(data)
    if path.is_dir():
        return path.resolve()
    if path.is_file() and path.suffix.lower() not in (".tar", ".tgz", ".gz"):
        return path.parent.resolve()
    return None


def folder_name(folder: Path) -> str:
    """An index folder's name as a server calls it: ``photos.index`` -> ``photos`` (``.index`` is what the
    folder is, not which one)."""
    name = folder.resolve().name
    return name.removesuffix(INDEX_SUFFIX) or name


def roots_of(index: Index) -> list[tuple[int, int, Path, str]]:
    """Per build of ``index`` that read image files: its first id, last id, folder and path column."""
    return [(b["ids"][0], b["ids"][1], root, b["image_key"]) for b in index.manifest["builds"]
            if b["ids"] and (root := data_root(b["data"])) is not None]  # fmt: skip


def index_names(indexes: Mapping[str, Any] | Sequence[Any]) -> list[tuple[str, Any]]:
    """``(name, folder or Index)`` from a mapping, or from folders (named by their last part, less an ``.index``
    suffix: ``photos.index`` serves as ``photos``) and ``name=DIR`` strings; names checked before anything is
    opened."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(indexes, Mapping):
        pairs = list(indexes.items())
    else:
        for entry in indexes:
            if isinstance(entry, Index):
                pairs.append((folder_name(entry.folder), entry))
                continue
            name, sep, folder = str(entry).partition("=")
            pairs.append((name, folder) if sep and NAME.fullmatch(name) else (folder_name(Path(entry)), entry))
    if not pairs:
        raise ValueError("give at least one index folder to serve (`mmlm index build` writes one)")
    seen: set[str] = set()
    for name, _ in pairs:
        if not NAME.fullmatch(name):
            raise ValueError(f"index name {name!r}: use letters, digits, '.', '_' and '-' (name it with NAME=DIR)")
        if name in seen:
            raise ValueError(f"two indexes named {name!r}: name them apart with NAME=DIR")
        seen.add(name)
    return pairs


def open_indexes(
    indexes: Mapping[str, Any] | Sequence[Any], model: str | nn.Module | None = None, device: str = "cpu",
    int8: bool = False, runtime: str = "torch", onnx: str | Path | None = None, threads: int | None = None,
) -> dict[str, Served]:  # fmt: skip
    """Each index with a runtime of the model its manifest names (one per model), refused unless that model's
    weights hash is the one the index was built with.

    ``runtime="torch"``: the model itself (``mmlm.retrieval.model.built_with``); ``model``: where it is now, if it
    moved; ``int8``: encode queries with an int8 copy of it (as they are anyway for an index embedded in int8).
    ``runtime="onnx"``: the ONNX folder ``onnx`` names, else the one beside each index (``photos.index`` ->
    ``photos.onnx``), on ``threads`` threads; ``int8``: that folder must hold the int8 export. Whatever this
    opened is closed again if a later index fails."""
    if runtime not in ("torch", "onnx"):
        raise ValueError(f"runtime {runtime!r}: use torch or onnx")
    runtimes: dict[Any, Runtime] = {}
    exported: dict[Path, OnnxRuntime] = {}
    served: dict[str, Served] = {}
    opened: list[Index] = []
    try:
        for name, value in index_names(indexes):
            index = value if isinstance(value, Index) else Index.open(value)
            if index is not value:
                opened.append(index)  # a caller's own Index is the caller's to close
            built = index.manifest["model"]
            if runtime == "onnx":
                chosen: Runtime = onnx_for(index.folder, built, onnx, exported, threads, int8)
            else:
                quantized = int8 or bool(built.get("int8", False))
                where = model if model is None or isinstance(model, (str, Path)) else id(model)
                key = (where, built["spec"], built["act"], built["seed"], built["tokenizer"], built["weights_hash"],
                       quantized)  # fmt: skip
                if key not in runtimes:
                    runtimes[key] = torch_runtime(built, index.folder, model, device, quantized)
                chosen = runtimes[key]
            served[name] = Served(name, index, chosen, roots_of(index))
    except BaseException:
        for index in opened:
            index.close()
        raise
    return served


def torch_runtime(built: dict[str, Any], folder: Path, model: Any, device: str, int8: bool) -> Runtime:
    """The model of an index's manifest entry ``built``, loaded in float32 whatever the index (``/explain``
    needs gradients, which int8 layers do not have), its queries through an int8 copy when ``int8``."""
    from mmlm.retrieval.model import built_with
    from mmlm.serve.runtime.torch import TorchRuntime

    loaded = built_with({**built, "int8": False}, folder, model, device)
    return TorchRuntime(loaded.model, loaded.require_tokenizer(), device, int8, built["weights_hash"])
