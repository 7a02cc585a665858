"""mmlm -> a transformers folder that transformers' own classes and pipelines load offline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from mmlm import checkpoint
from mmlm.convert import hf_clip
from mmlm.convert.common import ConversionError
from mmlm.models import CLIP

if TYPE_CHECKING:
    from mmlm.data.tokenizers import Tokenizer


def export(model: nn.Module, folder: Path, *, tokenizer: Tokenizer | None = None) -> Path:
    if isinstance(model, CLIP):
        return _clip(model, folder)
    from mmlm.export import hf_encoders  # BERT / GPT-2 with their heads, ViT classifiers

    return hf_encoders.export(model, folder, tokenizer=tokenizer)


def _clip(model: CLIP, folder: Path) -> Path:
    import transformers

    cfg = model.cfg
    hf_config = transformers.CLIPConfig(**hf_clip.config_to_hf(cfg))  # raises for what HF cannot express
    sd = hf_clip.mmlm_to_hf_clip(model.state_dict(), cfg)
    hf_config.architectures = ["CLIPModel"]
    hf_config.save_pretrained(folder)
    # the same file transformers' save_pretrained writes: safetensors with format "pt"
    checkpoint.save_safetensors(
        {k: v.detach().cpu().float().contiguous() for k, v in sd.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    v = cfg.vision
    transformers.CLIPImageProcessor(
        size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size},
        image_mean=list(v.image_mean), image_std=list(v.image_std),
        resample=3 if v.interpolation == "bicubic" else 2,  # PIL.Image.BICUBIC / BILINEAR
    ).save_pretrained(folder)  # fmt: skip
    return folder
