"""Evaluation of image-text models, the way CLIP_benchmark evaluates them.

- ``mmlm.eval.zeroshot``: the zero-shot classifier, prompt templates, classification metrics, confusion matrix.
- ``mmlm.eval.retrieval``: image-text retrieval metrics in bounded memory.
- ``mmlm.eval.results``: CLIP_benchmark's result JSON (the model under evaluation comes from ``mmlm.factory.load``).
- ``mmlm.eval.clip_benchmark``: ``load_clip_benchmark``, an mmlm model inside CLIP_benchmark itself.

The datasets evaluated on are in ``mmlm.data.eval_datasets``. Nothing is imported here, so that
``mmlm.eval.retrieval`` stays importable with torch alone.
"""
