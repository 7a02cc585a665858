"""Image-text retrieval: evaluation in bounded memory, (later) an embedding index and its HTTP API."""

from mmlm.retrieval.evaluate import embed_image_captions, evaluate_retrieval, retrieval_metrics

__all__ = ["embed_image_captions", "evaluate_retrieval", "retrieval_metrics"]
