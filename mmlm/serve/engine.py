"""The model side of a query: one ``Engine`` per model (tokenizer, eval transform, encoders), and the torch /
FAISS settings of the thread that runs it."""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch
from torch import nn

from mmlm.data.tokenizers import Tokenizer
from mmlm.data.transforms import image_transform

BLAS_FROM = 2  # queries of one FAISS exact search from which it goes through BLAS (see compute_settings)


class Engine:
    """One model, as the indexes built with it need it: tokenizer, eval transform, encoders in inference mode.

    ``int8``: queries go through an int8 copy (``mmlm.compress.quantize_int8``, CPU); ``model`` stays
    float32 for ``/explain``, whose gradients int8 layers do not have.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: str | torch.device, int8: bool = False) -> None:
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, torch.device(device)
        if int8:
            from mmlm.compress import quantize_int8

            self.encoder = quantize_int8(self.model)
        else:
            self.encoder = self.model
        self.transform = image_transform(model.cfg.vision, train=False)
        self.dim = int(model.cfg.embed_dim)
        self._explainer: nn.Module | None = None
        self._explainer_lock = threading.Lock()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts)
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        return self.encoder.encode_text(ids, mask).float().cpu().numpy()  # (B, D)

    @torch.inference_mode()
    def encode_image(self, pixels: list[torch.Tensor]) -> np.ndarray:
        return self.encoder.encode_image(torch.stack(pixels).to(self.device)).float().cpu().numpy()  # (B, D)

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


def compute_settings(threads: int) -> None:
    """torch's and FAISS's threads, set in the model thread (FAISS reads OpenMP's count per calling thread),
    and FAISS's exact search through BLAS from ``BLAS_FROM`` queries: FAISS 1.15 scores up to 128,000
    queries one by one, each reading the whole index, where one matrix product reads it once per batch
    (100k x 512: 10 ms a query one by one, 1.4 ms in a batch of 64; scripts/bench.py --only query)."""
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM
