"""mmlm: a multimodal vision-language toolkit built on one shared Transformer block."""

from mmlm.checkpoint import load, save
from mmlm.config import CLIPConfig, TextConfig, VisionConfig, from_name, list_presets
from mmlm.data.tokenizers import get_tokenizer
from mmlm.models import CLIP, TextEncoder, TextWithHeads, VisionTransformer, create_model
# mmlm.convert is the converters' package; the convert(src, dst, to) entry point is mmlm.pretrained.convert
from mmlm.pretrained import export_hf_clip, load_pretrained

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "TextEncoder",
    "TextWithHeads",
    "VisionConfig",
    "VisionTransformer",
    "create_model",
    "export_hf_clip",
    "from_name",
    "get_tokenizer",
    "list_presets",
    "load",
    "load_pretrained",
    "save",
]
