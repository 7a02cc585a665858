"""The thread settings of the model worker: torch's (when the torch runtime loaded it) and FAISS's."""

from __future__ import annotations

import sys

BLAS_FROM = 2  # queries of one FAISS exact search from which it goes through BLAS (see compute_settings)


def compute_settings(threads: int) -> None:
    """torch's and FAISS's threads, set in the model thread (FAISS reads OpenMP's count per calling thread),
    and FAISS's exact search through BLAS from ``BLAS_FROM`` queries: FAISS 1.15 scores up to 128,000
    queries one by one, each reading the whole index, where one matrix product reads it once per batch
    (100k x 512: 10 ms a query one by one, 1.4 ms in a batch of 64; scripts/bench.py --only query).
    ONNX Runtime takes its threads when its sessions open (``OnnxEncoder.open``); torch is only set when
    something imported it, so a server without torch does not load it for this."""
    import faiss

    if (torch := sys.modules.get("torch")) is not None:
        torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM
