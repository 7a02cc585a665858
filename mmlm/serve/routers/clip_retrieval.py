"""clip-retrieval's routes with its request and response schema, so its ``ClipClient`` and web front end work
unchanged: ``/knn-service``, ``/indices-list``, ``/metadata``; and, with ``--clip_front``, that front end itself
under ``/clip-front/`` with a ``config.json`` pointing it at this server (same origin: no CORS needed)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from mmlm.serve.batcher import Query
from mmlm.serve.deps import (
    JSON_BODY,
    BatcherDep,
    MetricsDep,
    ServedDep,
    SettingsDep,
    check_item,
    check_k,
    check_modality,
    pick,
)
from mmlm.serve.images import b64decode_async, fetch_image, item_bytes, own_item, rendered
from mmlm.serve.metrics import Metrics
from mmlm.serve.queries import clip_fields, make_query, metadata, search_ids
from mmlm.serve.schemas import KnnRequest, MetadataRequest
from mmlm.serve.served import Served
from mmlm.serve.settings import Settings

POSTS = ("/knn-service", "/metadata")  # its front end posts JSON as text/plain here (PlainTextJsonMiddleware)
FRONT = "/clip-front"  # where --clip_front serves the front end's files (its wheel's front/build)

router = APIRouter(tags=["clip-retrieval"])
front = APIRouter(prefix=FRONT, include_in_schema=False)  # included only with --clip_front, before the files


@router.post("/knn-service", dependencies=JSON_BODY)
async def knn_service(
    body: KnnRequest, request: Request, served: ServedDep, settings: SettingsDep, batcher: BatcherDep,
    metrics: MetricsDep,
) -> list[dict[str, Any]]:  # fmt: skip
    """clip-retrieval's query: ``num_result_ids`` results as ``{"id", "similarity", <metadata>}``, the
    metadata (``caption``, ``url`` and every column) on the first ``num_images``. An ``image_url`` naming
    this server's own ``/items/{index}/{id}/image`` (as the front end's "search by this image" sends it) is
    the item's stored image embedding: nothing is fetched."""
    s = pick(served, body.indice_name)
    total = body.num_result_ids or body.num_images
    check_k(settings, total, what="num_result_ids")
    check_modality(s, body.modality)
    own = own_item(body.image_url, str(request.base_url)) if body.image_url and not body.image else None
    if own is not None:
        query = await item_query(s, served, settings, metrics, *own)
    else:
        if body.image:
            image = await b64decode_async(body.image)
        elif body.image_url:
            image = await run_in_threadpool(fetch_image, body.image_url, settings.image_url_allow, settings.max_body)
        else:
            image = None
        query = await make_query(s, settings, metrics, body.text or None, image, body.embedding_input)
    ids, scores = await search_ids(batcher, s, query, body.modality, total, body.deduplicate)
    rows = await metadata(s, metrics, ids[: body.num_images])
    out = [front_fields(request, s, int(i), row) for i, row in zip(ids, rows)]
    out += [{} for _ in range(len(ids) - len(out))]
    for entry, i, score in zip(out, ids, scores):
        entry["id"], entry["similarity"] = int(i), float(score)
    return JSONResponse(out)  # type: ignore[return-value]


async def item_query(s: Served, served: dict[str, Served], settings: Settings, metrics: Metrics, name: str,
                     item: int) -> Query:  # fmt: skip
    """The query of a served item's picture, to search ``s``: its stored image embedding when ``s`` shares
    its index's model (no decode), else its image file or rendered pixels through ``s``'s model."""
    source = pick(served, name)
    check_item(source, item)
    if source.runtime is s.runtime:
        # a memmap row: a page fault may read the disk, so not on the event loop
        vector = await run_in_threadpool(lambda: np.asarray(source.index.embeddings("image")[item], np.float32))
        return await make_query(s, settings, metrics, vector=vector.tolist())
    row = (await metadata(source, metrics, np.array([item])))[0]
    data = await run_in_threadpool(item_bytes, source, item, row)
    if data is None:
        raise HTTPException(404, f"no image for item {item} of {source.name!r} on this server")
    return await make_query(s, settings, metrics, image=data)


def front_fields(request: Request, s: Served, item: int, row: dict[str, Any]) -> dict[str, Any]:
    """``clip_fields``, with a ``url`` for items whose picture is rendered rather than a file (digits): the
    front end shows nothing for a result without one."""
    out = clip_fields(request, s, item, row)
    if "url" not in out and row and rendered(s, item, row):
        out["url"] = f"{request.base_url}items/{s.name}/{item}/image"
    return out


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
    answer = [{"id": i, "metadata": front_fields(request, s, i, row) if row else {}} for i, row in zip(body.ids, rows)]
    return JSONResponse(answer)  # type: ignore[return-value]


@front.get("/config.json")
async def front_config(request: Request, served: ServedDep) -> dict[str, str]:
    """The front end's settings: its back end is this server, reached by path (same origin, under the
    proxy's root path), and its first index is this server's first (``?back=``/``?index=`` still override)."""
    return {"defaultBackend": request.base_url.path.rstrip("/"), "defaultIndex": next(iter(served)),
            "urlColumn": "url"}  # fmt: skip


@front.get("/vendor/webcomponents-loader.js")
async def front_polyfills() -> Response:
    """Its page loads this polyfill loader, which its wheel does not ship; browsers with native custom elements
    need none, so an empty script spares every page load a 404."""
    return Response("// custom elements are native in this browser: no polyfill to load\n",
                    media_type="text/javascript")  # fmt: skip
