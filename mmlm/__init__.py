"""mmlm: a multimodal vision-language toolkit built on one shared Transformer block."""

from mmlm.checkpoint import load, save
from mmlm.config import CLIPConfig, TextConfig, VisionConfig, from_name, list_presets
from mmlm.models import CLIP, TextEncoder, VisionTransformer, create_model

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "TextEncoder",
    "VisionConfig",
    "VisionTransformer",
    "create_model",
    "from_name",
    "list_presets",
    "load",
    "save",
]
