"""clip-retrieval's routes with its request and response schema, so its ``ClipClient`` and web front end work
unchanged: ``/knn-service``, ``/indices-list``, ``/metadata``."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from mmlm.serve.deps import JSON_BODY, BatcherDep, MetricsDep, ServedDep, SettingsDep, check_k, check_modality, pick
from mmlm.serve.images import b64decode_async, fetch_image
from mmlm.serve.queries import clip_fields, make_query, metadata, search_ids
from mmlm.serve.schemas import KnnRequest, MetadataRequest

POSTS = ("/knn-service", "/metadata")  # its front end posts JSON as text/plain here (PlainTextJsonMiddleware)

router = APIRouter(tags=["clip-retrieval"])


@router.post("/knn-service", dependencies=JSON_BODY)
async def knn_service(
    body: KnnRequest, request: Request, served: ServedDep, settings: SettingsDep, batcher: BatcherDep,
    metrics: MetricsDep,
) -> list[dict[str, Any]]:  # fmt: skip
    """clip-retrieval's query: ``num_result_ids`` results as ``{"id", "similarity", <metadata>}``, the
    metadata (``caption``, ``url`` and every column) on the first ``num_images``."""
    s = pick(served, body.indice_name)
    total = body.num_result_ids or body.num_images
    check_k(settings, total, what="num_result_ids")
    check_modality(s, body.modality)
    if body.image:
        image = await b64decode_async(body.image)
    elif body.image_url:
        image = await run_in_threadpool(fetch_image, body.image_url, settings.image_url_allow, settings.max_body)
    else:
        image = None
    query = await make_query(s, settings, metrics, body.text or None, image, body.embedding_input)
    ids, scores = await search_ids(batcher, s, query, body.modality, total, body.deduplicate)
    rows = await metadata(s, metrics, ids[: body.num_images])
    out = [clip_fields(request, s, int(i), row) for i, row in zip(ids, rows)]
    out += [{} for _ in range(len(ids) - len(out))]
    for entry, i, score in zip(out, ids, scores):
        entry["id"], entry["similarity"] = int(i), float(score)
    return JSONResponse(out)  # type: ignore[return-value]


@router.get("/indices-list")
async def indices_list(served: ServedDep) -> list[str]:
    """clip-retrieval's list of index names."""
    return list(served)


@router.post("/metadata", dependencies=JSON_BODY)
async def clip_metadata(
    body: MetadataRequest, request: Request, served: ServedDep, settings: SettingsDep, metrics: MetricsDep
) -> list[dict[str, Any]]:
    """clip-retrieval's metadata of ``ids``: ``[{"id", "metadata": {...}}]`` (empty for unknown ids)."""
    s = pick(served, body.indice_name)
    check_k(settings, len(body.ids) or 1, what="len(ids)")
    rows = await metadata(s, metrics, np.asarray(body.ids, dtype=np.int64))
    answer = [{"id": i, "metadata": clip_fields(request, s, i, row) if row else {}} for i, row in zip(body.ids, rows)]
    return JSONResponse(answer)  # type: ignore[return-value]
