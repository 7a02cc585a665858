"""What a search must return, computed with numpy from an index's stored embeddings."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from mmlm.paths import ASSETS

ATOL = 1e-5  # float32 forward passes of one query vs a batch of them


def item_of(name: str) -> int:
    """The id of a bundled photograph: its place in captions.csv."""
    with open(ASSETS / "captions.csv") as f:
        return list(dict.fromkeys(line.split(",")[0] for line in f.read().splitlines()[1:])).index(f"images/{name}")


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def by_item(index, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items ranked by their best caption: what a search on the text side must return."""
    scores = index.embeddings("text") @ (query / np.linalg.norm(query))
    best: dict[int, float] = {}
    for item, score in zip(index.text_ids.tolist(), scores.tolist()):
        best[item] = max(best.get(item, -2.0), score)
    order = sorted(best, key=lambda i: -best[i])
    return np.array(order), np.array([best[i] for i in order])
