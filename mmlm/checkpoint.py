"""mmlm's own checkpoint format: a folder with ``model.safetensors`` and ``config.json``.

safetensors holds only tensors (no pickle, no code), and the config beside it is
enough to rebuild the module before loading the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from mmlm.config import from_dict, to_dict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "mmlm"


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (anything with a ``cfg``) to the folder ``path``; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path / WEIGHTS_NAME, metadata={"format": FORMAT})
    (path / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "config": to_dict(model.cfg)}, indent=2))
    return path


def is_mmlm_checkpoint(path: str | Path) -> bool:
    config = Path(path) / CONFIG_NAME
    return config.is_file() and json.loads(config.read_text()).get("format") == FORMAT


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild the model saved by ``save`` and load its weights (strictly)."""
    from mmlm.models import create_model

    path = Path(path)
    if not is_mmlm_checkpoint(path):
        raise ValueError(f"{path} is not an mmlm checkpoint folder (expected {CONFIG_NAME} with format 'mmlm')")
    meta = json.loads((path / CONFIG_NAME).read_text())
    model = create_model(from_dict(meta["config"]))
    model.load_state_dict(load_file(path / WEIGHTS_NAME, device=device))
    return model.to(device)
