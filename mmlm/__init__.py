"""mmlm: a multimodal vision-language toolkit built on one shared Transformer block.

The public names below are imported on first use (PEP 562), so ``import mmlm`` and
``mmlm --help`` stay fast: torch, transformers and Lightning load only when a model,
a converter or a task is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmlm._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load": "mmlm.pretrained",
    "save": "mmlm.checkpoint",
    "CLIPConfig": "mmlm.config",
    "CoCaConfig": "mmlm.config",
    "TextConfig": "mmlm.config",
    "VisionConfig": "mmlm.config",
    "from_name": "mmlm.config",
    "list_presets": "mmlm.config",
    "get_tokenizer": "mmlm.data.tokenizers",
    "CLIP": "mmlm.models",
    "CoCa": "mmlm.models",
    "TextEncoder": "mmlm.models",
    "TextWithHeads": "mmlm.models",
    "VisionTransformer": "mmlm.models",
    "create_model": "mmlm.models",
    "resolve": "mmlm.factory",
    # mmlm.convert is the converters' package; the convert(src, dst, to) entry point is mmlm.export.convert
    "export_hf_clip": "mmlm.export.convert",
    "load_pretrained": "mmlm.pretrained",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mmlm.checkpoint import save
    from mmlm.config import CLIPConfig, CoCaConfig, TextConfig, VisionConfig, from_name, list_presets
    from mmlm.data.tokenizers import get_tokenizer
    from mmlm.export.convert import export_hf_clip
    from mmlm.factory import resolve
    from mmlm.models import CLIP, CoCa, TextEncoder, TextWithHeads, VisionTransformer, create_model
    from mmlm.pretrained import load, load_pretrained


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
