"""mmlm text encoders (BERT, GPT-2, with heads) and ViTs -> transformers folders (to be written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mmlm.convert.common import ConversionError


def export(model: nn.Module, folder: Path, *, tokenizer: Any = None) -> Path:
    raise ConversionError(f"--to hf does not export {type(model).__name__} yet")
