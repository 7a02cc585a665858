"""Model compression with its price measured: int8 inference (``quantize``) and structured pruning (``prune``).

Distillation is a training task: ``mmlm.tasks.ClipDistillation``. ``scripts/compress_table.py`` measures all three.
The names below are imported on first use, so that ``mmlm --help`` (which lists the commands of
``mmlm.compress.commands``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "is_int8": "mmlm.compress.quantize",
    "quantize_int8": "mmlm.compress.quantize",
    "prune_clip": "mmlm.compress.prune",
    "pruned_config": "mmlm.compress.prune",
}

__all__ = ["is_int8", "prune_clip", "pruned_config", "quantize_int8"]

if TYPE_CHECKING:
    from mmlm.compress.prune import prune_clip, pruned_config
    from mmlm.compress.quantize import is_int8, quantize_int8


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmlm.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
