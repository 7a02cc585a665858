"""Model compression with its price measured: int8 inference (``quantize``) and structured pruning (``prune``).

Distillation is a training task: ``mmlm.tasks.ClipDistillation``. ``scripts/compress_table.py`` measures all three.
The names below are imported on first use, so that ``mmlm --help`` (which lists the commands of
``mmlm.compress.commands``) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmlm._lazy import lazy_exports

_EXPORTS = {
    "is_int8": "mmlm.compress.quantize",
    "quantize_int8": "mmlm.compress.quantize",
    "prune_clip": "mmlm.compress.prune",
    "pruned_config": "mmlm.compress.prune",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mmlm.compress.prune import prune_clip, pruned_config
    from mmlm.compress.quantize import is_int8, quantize_int8


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
