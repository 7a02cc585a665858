"""Callbacks every ``mmlm fit`` run gets."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback


class RestoreRNG(Callback):
    """Save the torch / CUDA / numpy / python RNG states with each checkpoint and restore them on resume.

    Lightning restores weights, optimizer and loop counters but not the RNGs, so a resumed
    run would shuffle and augment differently from the run it continues. With this, a run
    killed and resumed from an epoch-end checkpoint ends with the same weights as one that
    was never interrupted.
    """

    def state_dict(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # as a tensor and plain numbers: Lightning reloads checkpoints with weights_only=True
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state_dict["python"])


def _numpy_state_to_torch(state: tuple) -> tuple:
    kind, keys, pos, has_gauss, gauss = state
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)
