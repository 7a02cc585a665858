"""Pure ``state_dict -> state_dict`` converters, one module per source family.

Each module also derives the mmlm config from the source's own config (a transformers
config.json) or from the tensor shapes (OpenAI/OpenCLIP, timm). Reading files and
choosing a converter is ``mmlm.pretrained``'s job.
"""

from mmlm.convert.common import ConversionError, run_plan
from mmlm.convert.hf_bert import hf_bert_to_mmlm
from mmlm.convert.hf_clip import (
    hf_clip_text_to_mmlm,
    hf_clip_to_mmlm,
    hf_clip_vision_to_mmlm,
    mmlm_to_hf_clip,
)
from mmlm.convert.hf_gpt2 import hf_gpt2_to_mmlm
from mmlm.convert.hf_vit import hf_vit_to_mmlm
from mmlm.convert.openclip import openclip_to_mmlm
from mmlm.convert.timm_vit import timm_vit_to_mmlm

__all__ = [
    "ConversionError",
    "hf_bert_to_mmlm",
    "hf_clip_text_to_mmlm",
    "hf_clip_to_mmlm",
    "hf_clip_vision_to_mmlm",
    "hf_gpt2_to_mmlm",
    "hf_vit_to_mmlm",
    "mmlm_to_hf_clip",
    "openclip_to_mmlm",
    "run_plan",
    "timm_vit_to_mmlm",
]
