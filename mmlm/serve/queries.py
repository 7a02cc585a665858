"""From a request to the model worker and back, shared by mmlm's and clip-retrieval's routes: one query out of
a text, an image, a vector or a stored item; its nearest ids (near copies dropped on request); their metadata
rows and image URLs. Whatever may take more than a fraction of a millisecond runs on a pool thread."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from mmlm.serve.batcher import Batcher, Query
from mmlm.serve.deps import check_item, check_text
from mmlm.serve.images import read_image
from mmlm.serve.metrics import Metrics
from mmlm.serve.served import Served
from mmlm.serve.settings import Settings

DEDUP_THRESHOLD = 0.94  # clip-retrieval's: two results this close (cosine of image embeddings) are one picture
DEDUP_LIMIT = 1000  # results compared for duplicates: n^2 similarities


async def decode(s: Served, data: bytes, settings: Settings, metrics: Metrics) -> torch.Tensor:
    start = time.perf_counter()
    pixels = await run_in_threadpool(lambda: s.engine.transform(read_image(data, settings.max_pixels)))
    metrics.stage("decode", time.perf_counter() - start)
    return pixels


async def make_query(
    s: Served, settings: Settings, metrics: Metrics, text: str | None = None, image: bytes | None = None,
    vector: list[float] | None = None, item: int | None = None,
) -> Query:  # fmt: skip
    given = [name for name, v in (("text", text), ("image", image), ("embedding", vector), ("item", item))
             if v is not None]  # fmt: skip
    if len(given) != 1:
        raise HTTPException(422, f"give exactly one of text, image, embedding, item (got {', '.join(given) or 'none'})")
    if text is not None:
        check_text(settings, text)
        return Query(s, text=text)
    if image is not None:
        return Query(s, pixels=await decode(s, image, settings, metrics))
    if vector is not None:
        return Query(s, vector=check_vector(vector, s.index.dim, s.name))
    check_item(s, item)  # type: ignore[arg-type]
    # a memmap row: a page fault may read the disk, so not on the event loop
    stored = await run_in_threadpool(lambda: np.asarray(s.index.embeddings("image")[item], dtype=np.float32))
    return Query(s, vector=stored)


async def search_ids(
    batcher: Batcher, s: Served, query: Query, modality: str, k: int, dedup: bool
) -> tuple[np.ndarray, np.ndarray]:
    query.modality, query.k = modality, k
    answer = await batcher(query)
    ids, scores = answer.ids, answer.scores
    assert ids is not None and scores is not None  # a query with a modality is searched
    if dedup and len(ids):
        vectors = s.index.embeddings("image")
        keep = await run_in_threadpool(lambda: unique(vectors[ids]))  # memmap rows: a page fault reads the disk
        ids, scores = ids[keep], scores[keep]
    return ids, scores


async def metadata(s: Served, metrics: Metrics, ids: np.ndarray) -> list[dict[str, Any]]:
    start = time.perf_counter()
    rows = await run_in_threadpool(s.metadata, ids.tolist())  # SQLite pages: may read the disk
    metrics.stage("metadata", time.perf_counter() - start)
    return [row or {} for row in rows]


def image_url(request: Request, s: Served, item: int, meta: dict[str, Any]) -> str | None:
    """``item_image``'s URL (index names need no quoting), under the proxy's prefix and host."""
    return f"{request.base_url}items/{s.name}/{item}/image" if s.has_image(item, meta) else None


def clip_fields(request: Request, s: Served, item: int, row: dict[str, Any]) -> dict[str, Any]:
    """An item's metadata as clip-retrieval's front end reads it: every column, ``caption`` (the first
    caption when the caption column has another name) and ``url`` (the image on this server)."""
    out = {k: v for k, v in row.items() if k not in ("id", "captions")}
    if "caption" not in out and row.get("captions"):
        out["caption"] = row["captions"][0]
    if "url" not in out and (url := image_url(request, s, item, row)) is not None:
        out["url"] = url
    return out


def check_vector(values: list[float], dim: int, name: str) -> np.ndarray:
    """A unit float32 vector from a client's list: the index's length, finite, not zero."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (dim,):
        raise HTTPException(422, f"embedding of length {v.size}; index {name!r} holds {dim}-d vectors")
    if not np.isfinite(v).all():
        raise HTTPException(422, "embedding: NaN or infinite values")
    top = np.abs(v).max()
    if top == 0:
        raise HTTPException(422, "embedding: a zero vector has no direction to search")
    v = v / top  # scaled first: the norm of values near 1e308 would overflow
    return (v / np.linalg.norm(v)).astype(np.float32)


def unique(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Mask of the results to keep, best first: one is dropped when a better-ranked kept result is within
    cosine ``threshold`` of it (compared over the first ``DEDUP_LIMIT`` results)."""
    n = min(len(vectors), DEDUP_LIMIT)
    v = np.asarray(vectors[:n], dtype=np.float32)
    v = v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)
    sims = v @ v.T
    keep = np.ones(len(vectors), dtype=bool)
    for i in range(n):
        if keep[i]:
            keep[i + 1 : n] &= sims[i, i + 1 : n] < threshold
    return keep
