"""mmlm ViT -> a timm hub folder: ``model.safetensors`` under timm's key names and its ``config.json``.

timm loads the folder with its own code::

    timm.create_model("local-dir:DIR", pretrained=True)

or by the architecture name, given the folder's pretrained config as the overlay::

    cfg = json.load(open("DIR/config.json"))
    timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"], **cfg["model_args"],
                      pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="DIR/model.safetensors"))

An overlay of the file alone keeps the name's registered config, whose 1000 classes make timm
drop any other head and keep a random one, saying so only in an INFO log line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlm import checkpoint
from mmlm.convert import timm_vit
from mmlm.convert.common import ConversionError
from mmlm.models import CLIP, VisionTransformer


def export(model: nn.Module, folder: Path, *, tokenizer: Any = None, final: Path | None = None) -> Path:
    """``tokenizer`` is ignored: a timm model takes images only."""
    if isinstance(model, CLIP):
        raise ConversionError("timm holds image models: export the CLIP's image tower, model.visual")
    if not isinstance(model, VisionTransformer):
        raise ConversionError(f"--to timm exports ViTs (mmlm.VisionTransformer), not {type(model).__name__}")
    cfg = model.cfg
    config = timm_vit.hub_config(cfg)  # raises for what timm cannot express
    sd = {k: v.detach().cpu().contiguous() for k, v in timm_vit.mmlm_to_timm_vit(model.state_dict(), cfg).items()}
    _check_timm_takes(config, sd)
    checkpoint.save_safetensors(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def _check_timm_takes(config: dict[str, Any], sd: dict[str, torch.Tensor]) -> None:
    """Load strictly into the timm model the config names (built on the meta device: no memory), so a
    key or shape timm would refuse fails here rather than in the user's hands."""
    import timm

    with torch.device("meta"):
        ref = timm.create_model(
            config["architecture"], pretrained=False, num_classes=config["num_classes"], **config["model_args"]
        )
    try:
        ref.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ConversionError(f"timm's {config['architecture']} does not take these weights: {e}") from e
