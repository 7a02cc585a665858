"""mmlm -> open_clip (to be written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mmlm.convert.common import ConversionError


def export(model: nn.Module, folder: Path, *, tokenizer: Any = None) -> Path:
    raise ConversionError("--to open_clip is not written yet")
