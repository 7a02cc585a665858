"""The floor every checkpoint reader stands on: safe reading, format detection, and mmlm's own format.

- Reading is safe: safetensors first; pickled files only through ``torch.load(weights_only=True)``;
  TorchScript archives (OpenAI's original ``.pt`` files are ones) are refused, since loading them
  runs code from the file (``read_state_dict``, ``read_folder_weights``).
- ``detect_format`` tells the formats apart by their files and keys; ``mmlm.pretrained`` turns each
  into a model, above ``mmlm.models``.
- mmlm's own format is a folder with ``model.safetensors`` and ``config.json``: safetensors holds
  only tensors (no pickle, no code), and the config beside it is enough to rebuild the module
  before loading the weights (``save``; ``mmlm.load`` reads it back).

Nothing here builds a model, so everything above can import it. The file helpers here (``read_json``, ``read_safetensors``, ``safetensors_header``,
``save_safetensors``) are what every reader and writer of model folders uses, so a
broken file gets the same one-line message naming it wherever it is met; where a
folder may be written is ``mmlm.outputs``' rule.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmlm import outputs
from mmlm.config import to_dict
from mmlm.convert.common import ConversionError, StateDict

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


SAFE_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors")
PICKLED_WEIGHTS = ("pytorch_model.bin", "open_clip_pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# ------------------------------------------------------------------------------ reading


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder and ``constants.pkl``; ``torch.save`` ones have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of one weights file: ``.safetensors``, or a ``torch.save`` pickle read with ``weights_only=True``.

    Training checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``)
    and DDP's ``module.`` prefix are unwrapped. fp16/bf16 tensors are returned as stored;
    ``load_state_dict`` casts them into the fp32 model.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise ConversionError(
            f"{path}: unknown weights file type {path.suffix!r} (expected .safetensors, .bin, .pt, .pth)"
        )
    if is_torchscript(path):
        raise ConversionError(
            f"{path} is a TorchScript archive (e.g. an original OpenAI CLIP .pt). mmlm refuses to load those because "
            "loading one runs code stored in the file. If you trust it, extract the weights yourself, e.g. "
            "`safetensors.torch.save_file(torch.jit.load(path, map_location='cpu').state_dict(), 'weights.safetensors')`, "
            "and load that file."
        )
    obj = torch_load(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {bad[:10]}")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a ConversionError naming the file when it cannot be read that way.

    ``mmap``: the tensors are memory-mapped, not read (for a look at what else a checkpoint holds); only a
    zip-format file (every ``torch.save`` since torch 1.6) can be mapped, an older one is read as usual.

    An empty, cut-short or non-pickle file fails inside torch's pure-Python unpickler with whatever
    it trips over (``EOFError``, ``RuntimeError``, ``KeyError: 101``, ``IndexError``, ``UnpicklingError``)
    and a message that names neither the file nor the problem.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 -- any failure here means the file is not a readable checkpoint
        # weights_only failures bury the reason in a paragraph of advice
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(e))
        first_line = str(e).splitlines()[0] if str(e) else "the file ends early"
        detail = reason.group(1) if reason else f"{type(e).__name__}: {first_line}"
        raise ConversionError(f"{path} is not a valid or complete PyTorch checkpoint ({detail})") from e


def read_folder_weights(folder: Path, names: tuple[str, ...] = SAFE_WEIGHTS + PICKLED_WEIGHTS) -> StateDict:
    """The weights of a model folder: single or sharded (``*.index.json``), safetensors preferred."""
    for name in names:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            sd: StateDict = {}
            for shard in shards:
                sd |= read_state_dict(folder / shard)
            return sd
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise ConversionError(f"{folder}: no weights file (looked for {', '.join(names)} and their sharded indexes)")


def json_or_none(path: Path) -> Any:
    """The parsed JSON file, or None where there is no such file."""
    return read_json(path) if path.is_file() else None


# ------------------------------------------------------------------------------ detection


def detect_format(path: str | Path) -> str:
    """One of ``mmlm``, ``lightning``, ``sentence-transformers``, ``hf-<model_type>``, ``timm``, ``openclip``."""
    path = Path(path)
    if path.is_dir():
        if is_mmlm_checkpoint(path):
            return "mmlm"
        if (path / "modules.json").is_file():
            return "sentence-transformers"
        if (path / "open_clip_config.json").is_file():
            return "openclip"
        config = json_or_none(path / "config.json")
        if config is not None and "architecture" in config:
            return "timm"
        if config is not None and "model_type" in config:
            return f"hf-{config['model_type']}"
        raise ConversionError(
            f"{path}: not a checkpoint folder mmlm knows (no usable config.json, modules.json or open_clip_config.json)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file or folder {str(path)!r}")
    if path.suffix == ".ckpt":
        return "lightning"
    keys = _keys(path)
    if "visual.conv1.weight" in keys:
        return "openclip"
    if "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys:
        return "timm"
    if any(
        k.startswith(("text_model.", "vision_model.", "bert.", "embeddings.", "transformer.h.", "wte.", "vit."))
        for k in keys
    ):
        raise ConversionError(
            f"{path} looks like a transformers checkpoint: pass the folder holding it and its config.json"
        )
    raise ConversionError(f"{path}: unrecognised state dict (first keys: {sorted(keys)[:8]})")


def _keys(path: Path) -> set[str]:
    if path.suffix == ".safetensors":
        keys, metadata = safetensors_header(path)
        if metadata.get("format") == FORMAT:
            raise ConversionError(f"{path} is an mmlm weights file: pass its folder (with config.json)")
        return keys
    return set(read_state_dict(path))


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
