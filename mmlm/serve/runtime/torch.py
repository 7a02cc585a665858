"""``TorchRuntime``: the model itself behind ``Runtime``: float32 or an int8 copy for the queries, and the
float model for ``/explain``. The only serving module that imports torch (and the model code)."""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmlm.data.tokenizers import Tokenizer
from mmlm.data.transforms import image_transform
from mmlm.serve.runtime.base import Runtime


class TorchRuntime(Runtime):
    """One model, as the indexes built with it need it: tokenizer, eval transform, encoders in inference mode.

    ``int8``: queries go through an int8 copy (``mmlm.compress.quantize_int8``, CPU); ``model`` stays
    float32 for ``/explain``, whose gradients int8 layers do not have.
    """

    name = "torch"
    can_explain = True

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: str | torch.device, int8: bool = False,
                 weights_hash: str = "") -> None:  # fmt: skip
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, torch.device(device)
        if int8:
            from mmlm.compress import quantize_int8

            self.encoder = quantize_int8(self.model)
        else:
            self.encoder = self.model
        self.transform = image_transform(model.cfg.vision, train=False)
        self.dim = int(model.cfg.embed_dim)
        self.image_size = int(model.cfg.vision.image_size)
        self.weights_hash = weights_hash
        self.can_caption = hasattr(model, "generate") and tokenizer is not None  # a CoCa: its decoder writes captions
        self._explainer: nn.Module | None = None
        self._explainer_lock = threading.Lock()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts)
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        return self.encoder.encode_text(ids, mask).float().cpu().numpy()  # (B, D)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.transform(image).numpy()  # (3, H, W)

    @torch.inference_mode()
    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.encode_image(torch.from_numpy(pixels).to(self.device)).float().cpu().numpy()  # (B, D)

    def explain(self, image: Image.Image, text: str, method: str | None = None) -> bytes:
        from mmlm.explain import heatmap_png

        return heatmap_png(self.explainer, self.tokenizer, image, text, **({"method": method} if method else {}))

    def caption(self, image: Image.Image, max_new_tokens: int = 20, num_beams: int = 1) -> str:
        """Greedy (or beam) caption by the float model, on the explainer's thread (``POST /caption``)."""
        from mmlm.caption import captions_of

        pixels = self.transform(image)[None].to(self.device)
        return captions_of(self.model, self.tokenizer, pixels, max_new_tokens=max_new_tokens, num_beams=num_beams)[0]

    @property
    def explainer(self) -> nn.Module:
        """The float model ``/explain`` runs, on its own thread beside the searches: a private copy when the
        searches run the float model too, since some explanation methods hook into the model (a hook must
        never meet a search batch); made on first use, so a server nobody asks to explain pays no memory."""
        if self.encoder is not self.model:
            return self.model  # the searches run the int8 copy: the float model is free
        with self._explainer_lock:
            if self._explainer is None:
                self._explainer = copy.deepcopy(self.model)
            return self._explainer
