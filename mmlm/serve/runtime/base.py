"""What the model worker needs of a model, whichever library runs it: ``Runtime``.

Everything crosses this interface as NumPy (pixels in, embeddings out), so the worker, the routes and the
index search never touch a tensor type, and a server that runs ONNX Runtime never imports torch::

    PIL image ─preprocess─► (3, H, W) float32 ─┐ stacked ─encode_image─► (B, D) float32, L2-normalised
    texts ─────────────────────────────────────┴──────────encode_text──► (B, D) float32, L2-normalised

Two implement it: ``mmlm.serve.runtime.torch.TorchRuntime`` (the model itself, float32 or int8, and
``/explain``) and ``mmlm.serve.runtime.load.OnnxRuntime`` (an exported folder through ONNX Runtime).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from PIL import Image


class Runtime(ABC):
    """One model's encoders, as the indexes built with it need them. Called from the model worker's thread
    only (``preprocess`` also from the routes' pool threads: it must hold no state)."""

    name: str  # "torch" or "onnx": said in /indices and in refusals
    dim: int  # embedding size, the index's
    image_size: int  # side of the square ``preprocess`` makes
    weights_hash: str  # of the float weights (``mmlm.factory.weights_hash``), as the index manifest records it
    can_explain = False  # whether ``explain`` draws heatmaps (it needs the model's gradients or hooks)
    can_caption = False  # whether ``caption`` can say what is in a picture (a CoCa served by torch)
    image_on_first_use = False  # whether the image encoder is loaded by the first image (so no warm-up loads it)

    @abstractmethod
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """(B, D) float32 unit vectors of ``texts``."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32: the model's eval transform of an RGB image (resize, centre crop, normalise)."""

    @abstractmethod
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(B, D) float32 unit vectors of (B, 3, H, W) preprocessed pixels."""

    def explain(self, image: Image.Image, text: str, method: str | None = None) -> bytes:
        """PNG of ``image`` with where ``text`` matches it; only where ``can_explain``."""
        raise NotImplementedError(f"the {self.name} runtime cannot explain a match: serve with --runtime torch")

    def caption(self, image: Image.Image, max_new_tokens: int = 20, num_beams: int = 1) -> str:
        """What is in ``image``, in words; only where ``can_caption``."""
        raise NotImplementedError(f"the {self.name} runtime of this model cannot caption")
