"""The model an index was built with: what ``index add`` embeds new items with and what ``mmlm serve`` answers with.

The index's ``manifest.json`` records the model as it was named, with what picks its weights and tokenizer
(``act``, ``seed``, ``tokenizer``, ``int8``) and the hash of its float weights. ``built_with`` loads it through
``mmlm.factory`` and refuses any other weights: embeddings of two models cannot share an index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mmlm.factory import Loaded, load

USE = "an index of images and captions"  # what needs an image-text model, for the refusal


def built_with(
    entry: dict[str, Any], folder: str | Path, model: str | Path | nn.Module | None = None, device: str = "cpu"
) -> Loaded:
    """The model of the index in ``folder`` whose manifest ``model`` entry is ``entry``, on ``device``, int8 when
    the index was embedded so; ``model`` names the same weights elsewhere (another path, a module in memory)."""
    spec = entry["spec"] if model is None else model
    loaded = load(spec, tokenizer=entry.get("tokenizer"), act=entry.get("act"), device=device,
                  seed=entry.get("seed", 0), int8=bool(entry.get("int8", False)), image_text=USE)  # fmt: skip
    if loaded.weights_hash != entry["weights_hash"]:
        raise ValueError(
            f"{spec} is not the model {folder} was built with (weights hash {loaded.weights_hash[:12]}, the index has "
            f"{entry['weights_hash'][:12]} from {entry['spec']}): embeddings of two models cannot share an index"
        )
    return loaded
