"""From a request to the model worker and back, shared by mmlm's and clip-retrieval's routes: one query out of
a text, an image, a vector or a stored item; its nearest ids (near copies dropped on request); their metadata
rows and image URLs. Whatever may take more than a fraction of a millisecond runs on a pool thread."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import faiss
import numpy as np
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from mmlm.retrieval.index import search_parameters
from mmlm.serve.batcher import Batcher, Query
from mmlm.serve.deps import check_item, check_text
from mmlm.serve.images import b64decode_async, read_image
from mmlm.serve.metrics import Metrics
from mmlm.serve.schemas import MAX_TERMS, Term
from mmlm.serve.served import Served
from mmlm.serve.settings import Settings

DEDUP_THRESHOLD = 0.94  # clip-retrieval's: two results this close (cosine of image embeddings) are one picture
DEDUP_LIMIT = 1000  # results compared for duplicates: n^2 similarities


async def decode(s: Served, data: bytes, settings: Settings, metrics: Metrics) -> np.ndarray:
    """The image's pixels as the index's runtime takes them, (3, H, W), decoded and transformed on a pool thread."""
    start = time.perf_counter()
    pixels = await run_in_threadpool(lambda: s.runtime.preprocess(read_image(data, settings.max_pixels)))
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


async def combined_query(s: Served, settings: Settings, metrics: Metrics, batcher: Batcher, terms: list[Term]) -> Query:
    """One query vector out of weighted terms: the normalised sum of ``weight * embedding`` over the terms, each
    embedding L2-normalised first (so a weight says how much a term counts, whatever kind it is). The texts and
    images go through the model worker together, batched with whatever else it is doing."""
    if not 1 <= len(terms) <= MAX_TERMS:
        raise HTTPException(422, f"terms: give 1 to {MAX_TERMS} terms, not {len(terms)}")
    for n, t in enumerate(terms):
        if not math.isfinite(t.weight):
            raise HTTPException(422, f"terms[{n}]: weight {t.weight}: give a finite number")
    if not any(t.weight for t in terms):
        raise HTTPException(422, "terms: every weight is 0; give at least one term a weight")
    parts = []
    for n, t in enumerate(terms):
        try:
            image = await b64decode_async(t.image) if t.image is not None else None
            parts.append(await make_query(s, settings, metrics, t.text, image, t.embedding, t.item))
        except HTTPException as e:
            raise HTTPException(e.status_code, f"terms[{n}]: {e.detail}") from None
    encoded = await asyncio.gather(*(batcher(q) for q in parts if q.vector is None))
    vectors = iter(a.vector for a in encoded)
    stacked = np.stack([q.vector if q.vector is not None else next(vectors) for q in parts]).astype(np.float64)
    stacked /= np.linalg.norm(stacked, axis=1, keepdims=True).clip(1e-12)
    total = np.asarray([t.weight for t in terms]) @ stacked
    norm = float(np.linalg.norm(total))
    if not norm > 1e-6:
        raise HTTPException(422, "terms: the weighted terms cancel out (their sum is the zero vector)")
    return Query(s, vector=(total / norm).astype(np.float32))


async def select_ids(s: Served, where: dict[str, Any] | None, modality: str) -> tuple[np.ndarray | None, str | None]:
    """The ids ``where`` selects (``Index.select``, on a pool thread: it reads SQLite) and its canonical JSON,
    which lets queries with the same filter share one FAISS search; (None, None) without a filter."""
    if not where:
        return None, None

    def select() -> np.ndarray:
        # a kind of index a selection cannot go into is refused here, not in the worker (which fails its batch)
        search_parameters(s.index.faiss(modality), faiss.IDSelectorBatch(np.zeros(1, dtype=np.int64)))
        with s.lock:  # one SQLite connection per index, one thread at a time
            return s.index.select(where)

    try:
        ids = await run_in_threadpool(select)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    return ids, json.dumps(where, sort_keys=True)


async def search_ids(
    batcher: Batcher, s: Served, query: Query, modality: str, k: int, dedup: bool, ids: np.ndarray | None = None,
    where: str | None = None, min_score: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The ``k`` nearest ids and their scores (of the ``ids`` selected by ``where``; none below ``min_score``)."""
    query.modality, query.k = modality, k
    query.ids, query.where, query.min_score = ids, where, min_score
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
