"""The model an evaluation runs on and the result it writes, in CLIP_benchmark's JSON layout.

``mmlm zeroshot`` and ``mmlm eval-retrieval`` take a model (``mmlm.factory.load``), a dataset
(``mmlm.data.eval_datasets``) and write one result (``benchmark_result``, ``write_result``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmlm.data.skips import SkippingDataLoader
from mmlm.paths import resolve


def describe_model(spec: str | Path, seed: int = 0) -> tuple[str, str]:
    """The ``model`` and ``pretrained`` fields of a result: the argument as given, and the weights' source."""
    path = resolve(spec)
    return str(spec), str(path.resolve()) if path.exists() else f"random-init-seed{seed}"


def benchmark_result(
    dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, float | None], language: str = "en",
    samples: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One run's result, in the JSON layout CLIP_benchmark writes (and its ``build_csv`` reads),
    plus ``samples``: what the metrics were computed on (see ``sample_counts``)."""
    result = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
              "language": language}  # fmt: skip
    return result if samples is None else {**result, "samples": samples}


def sample_counts(loader: SkippingDataLoader) -> dict[str, Any]:
    """``{"used": N, "skipped": {reason: count}}`` of the loader's last full pass.

    A result computed on 1 image out of 3 must say so in the result, not only in a log line.
    """
    return {"used": loader.stats.good, "skipped": loader.stats.history[-1] if loader.stats.history else {}}


def write_result(result: dict[str, Any], path: str | Path | None = None, overwrite: bool = False) -> str:
    """Print the result as JSON and write it to ``path`` if given (an existing file only if ``overwrite``).

    Strict JSON: a metric that does not exist (acc5 with fewer than 5 classes) is ``null``, never
    ``NaN``, which JSON readers other than Python's refuse.
    """
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text)
    if path is not None:
        from mmlm import outputs

        outputs.write_file(path, text + "\n", overwrite)
    return text
