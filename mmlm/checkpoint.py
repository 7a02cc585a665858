"""mmlm's own checkpoint format: a folder with ``model.safetensors`` and ``config.json``.

safetensors holds only tensors (no pickle, no code), and the config beside it is
enough to rebuild the module before loading the weights.

The file helpers here (``read_json``, ``read_safetensors``, ``safetensors_header``,
``save_safetensors``) are what every reader and writer of model folders uses, so a
broken file gets the same one-line message naming it wherever it is met; where a
folder may be written is ``mmlm.outputs``' rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmlm import outputs
from mmlm.config import to_dict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "mmlm"

# ------------------------------------------------------------------------------ files


def read_json(path: str | Path) -> Any:
    """The parsed JSON file; a ValueError naming the file and the position when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a ValueError naming the file when it is empty, damaged or cut short."""
    try:
        return load_file(path, device=str(device))
    except SafetensorError as e:
        raise _invalid_safetensors(path, e) from e


def safetensors_header(path: str | Path) -> tuple[set[str], dict[str, str]]:
    """The tensor names and the metadata of a safetensors file, without reading the tensors."""
    try:
        with safe_open(path, "pt") as f:
            return set(f.keys()), f.metadata() or {}
    except SafetensorError as e:
        raise _invalid_safetensors(path, e) from e


def _invalid_safetensors(path: str | Path, error: Exception) -> ValueError:
    return ValueError(f"{path} is not a valid or complete safetensors file ({error})")


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, leaving the file with the permissions the user's umask gives new files.

    safetensors >= 0.8 writes through a temporary file, which is created 0600, and renames it
    into place (safetensors#782), so a saved model would be unreadable to other users.
    """
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------ the format


def save(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (anything with a ``cfg``) to the folder ``path``; returns the folder.

    ``path`` must be new or empty; ``overwrite=True`` replaces an mmlm model folder, nothing else
    (``mmlm.outputs``).
    """
    with outputs.writing(path, "mmlm", overwrite) as folder:
        write(model, folder)
    return Path(path)


def write(model: nn.Module, folder: Path) -> None:
    """The files of ``save`` in ``folder``, a folder the caller has claimed (``mmlm.outputs.writing``)."""
    quantization = _quantization(model)
    save_safetensors(tensors(model), folder / WEIGHTS_NAME, metadata={"format": FORMAT, **quantization})
    meta = {"format": FORMAT, "config": to_dict(model.cfg), **quantization}
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))


def is_mmlm_checkpoint(path: str | Path) -> bool:
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    meta = read_json(config)
    return isinstance(meta, dict) and meta.get("format") == FORMAT


# ------------------------------------------------------------------------------ int8 models (mmlm.compress)


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save`` writes, on the CPU: the state dict, or for an int8 model its int8 weights and
    their scales as they are (``mmlm.compress.quantize.int8_state_dict``), so the file is as small as the model."""
    from mmlm.compress.quantize import int8_state_dict, is_int8

    if is_int8(model):
        return int8_state_dict(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def _quantization(model: nn.Module) -> dict[str, str]:
    """The ``quantization`` entry of config.json and of the safetensors metadata; none for a float model."""
    from mmlm.compress.quantize import INT8, is_int8

    return {"quantization": INT8} if is_int8(model) else {}
