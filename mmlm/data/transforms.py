"""Image transforms whose size, interpolation and mean/std come from the model preset.

Eval is open_clip's preprocess (resize the short side, centre crop, normalise),
so a CLIP preset gives the tensors the OpenAI weights were trained on.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from mmlm.config import CLIPConfig, TextConfig, VisionConfig, from_name

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def vision_config(preset: str | Any) -> VisionConfig:
    """The VisionConfig of a preset name or config (a CLIP preset's ``.vision``)."""
    cfg = from_name(preset) if isinstance(preset, str) else preset
    cfg = getattr(cfg, "vision", cfg)
    if not isinstance(cfg, VisionConfig):
        raise ValueError(f"preset {preset!r} has no image tower")
    return cfg


def text_config(preset: str | Any) -> TextConfig:
    """The TextConfig of a preset name or config (``.text`` of a CLIP or text-with-heads preset)."""
    cfg = from_name(preset) if isinstance(preset, str) else preset
    cfg = getattr(cfg, "text", cfg)
    if not isinstance(cfg, TextConfig):
        raise ValueError(f"preset {preset!r} has no text tower")
    return cfg


def image_transform(
    vision_cfg: VisionConfig | CLIPConfig | str,
    train: bool,
    scale: tuple[float, float] = (0.9, 1.0),
    hflip: float = 0.5,
) -> Callable:
    """PIL image (or uint8 tensor) -> normalised float tensor (3, S, S), S = ``image_size``.

    Args:
        vision_cfg: a VisionConfig, a CLIP config or a preset name.
        train: random resized crop + horizontal flip; else resize + centre crop.
        scale: area range of the random crop. (0.9, 1.0) is open_clip's default for
            image-text training; ImageNet classification recipes use (0.08, 1.0).
        hflip: flip probability in training (0 for captions that say left/right).
    """
    cfg = vision_config(vision_cfg)
    size = cfg.image_size
    interpolation = _INTERPOLATION[cfg.interpolation]
    if train:
        geometry = [v2.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)]
        if hflip > 0:
            geometry.append(v2.RandomHorizontalFlip(hflip))
    else:
        geometry = [v2.Resize(size, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([
        v2.RGB(),
        *geometry,
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.image_mean), std=list(cfg.image_std)),
    ])  # fmt: skip
