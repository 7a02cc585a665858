"""The runtime of each served index, as ``mmlm serve --runtime`` names it: ``torch`` (the model the index
manifest names, loaded through ``mmlm.factory``) or ``onnx`` (a folder ``mmlm convert --to onnx`` wrote, by
default beside the index: ``photos.index`` -> ``photos.onnx``). Either is refused unless its float weights hash
is the one the index was built with: embeddings of two models cannot share an index.

Only the chosen runtime's module is imported: the ``onnx`` path loads ONNX Runtime and ``tokenizers``, never torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmlm.errors import UsageError
from mmlm.serve.runtime.base import Runtime

INDEX_SUFFIX = ".index"
ONNX_SUFFIX = ".onnx"
RUNTIMES = ("torch", "onnx")


class OnnxRuntime(Runtime):
    """An exported folder (``mmlm.serve.runtime.onnx.OnnxEncoder``) behind ``Runtime``; no ``/explain``
    (a heatmap needs the model's gradients or attention hooks, which an inference graph does not have)."""

    name = "onnx"
    image_on_first_use = True  # ``open_onnx``: the image graph's session is built by the first image query

    def __init__(self, encoder: Any, folder: Path) -> None:
        self.encoder, self.folder = encoder, folder
        self.dim, self.image_size = int(encoder.dim), int(encoder.image_size)
        self.weights_hash = str(encoder.weights_hash)
        self.int8 = bool(encoder.meta.get("int8", False))

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode_text(texts)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.encoder.preprocess(image)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.encode_image(pixels)


def onnx_beside(index_folder: str | Path) -> Path:
    """The ONNX folder an index uses by default: its sibling named like it, ``.index`` replaced by ``.onnx``
    (``photos.index`` or ``photos`` -> ``photos.onnx``)."""
    folder = Path(index_folder).resolve()
    return folder.with_name(folder.name.removesuffix(INDEX_SUFFIX) + ONNX_SUFFIX)


def open_onnx(folder: Path, threads: int | None = None, int8: bool = False) -> OnnxRuntime:
    """The exported model in ``folder``, its sessions on ``threads`` threads; ``int8``: refused unless the folder
    holds the int8 export (the flag cannot quantize an exported graph after the fact)."""
    from mmlm.serve.runtime.onnx import OnnxEncoder

    # the image graph on first use: a text query, the common one, is answered sooner and by a smaller process
    runtime = OnnxRuntime(OnnxEncoder.open(folder, threads=threads, lazy_image=True), folder)
    if int8 and not runtime.int8:
        raise UsageError(f"--int8 --runtime onnx: {folder} holds float32 graphs; export int8 ones with `mmlm convert "
                         f"MODEL DST --to onnx --int8` and name them with --onnx DST")  # fmt: skip
    return runtime


def onnx_for(index_folder: Path, entry: dict[str, Any], named: str | Path | None, opened: dict[Path, OnnxRuntime],
             threads: int | None = None, int8: bool = False) -> OnnxRuntime:  # fmt: skip
    """The ONNX runtime of the index in ``index_folder`` (manifest model ``entry``): the folder ``named`` by
    ``--onnx``, else the one beside the index; opened once per folder (``opened``), refused in one line
    naming both folders when it is missing or holds other weights."""
    folder = Path(named).resolve() if named is not None else onnx_beside(index_folder)
    if folder not in opened:
        if not (folder / "onnx.json").is_file():
            where = "--onnx names" if named is not None else "beside it,"
            raise UsageError(f"--runtime onnx: index {index_folder} needs its model exported to ONNX; {where} "
                             f"{folder} holds none (write it with `mmlm convert {entry['spec']} {folder} --to onnx`, "
                             "or name another with --onnx)")  # fmt: skip
        opened[folder] = open_onnx(folder, threads, int8)
    runtime = opened[folder]
    if runtime.weights_hash != entry["weights_hash"]:
        raise UsageError(f"{folder} is not the model {index_folder} was built with (weights hash "
                         f"{runtime.weights_hash[:12]}, the index has {entry['weights_hash'][:12]} from "
                         f"{entry['spec']}): export that model with `mmlm convert {entry['spec']} DST --to onnx`")  # fmt: skip
    return runtime
