"""Image-text retrieval: evaluation in bounded memory, (later) an embedding index and its HTTP API."""

from mmlm.retrieval.evaluate import retrieval_metrics

__all__ = ["retrieval_metrics"]
