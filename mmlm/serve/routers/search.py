"""mmlm's own routes: ``/search``, ``/embed``, ``/indices``, ``/items/{index}/{id}`` and ``/explain``."""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from PIL import Image

from mmlm.data.images import Skip, load_image
from mmlm.serve.deps import (
    JSON_BODY,
    BatcherDep,
    ExplainerDep,
    MetricsDep,
    ServedDep,
    SettingsDep,
    check_item,
    check_k,
    check_modality,
    pick,
)
from mmlm.serve.images import b64decode_async, read_image
from mmlm.serve.metrics import Metrics
from mmlm.serve.queries import combined_query, image_url, make_query, metadata, search_ids, select_ids
from mmlm.serve.schemas import (
    MAX_ID,
    CaptionRequest,
    CaptionResponse,
    EmbedRequest,
    EmbedResponse,
    ExplainRequest,
    SearchRequest,
    SearchResponse,
)
from mmlm.serve.served import Served
from mmlm.serve.settings import Settings

EXPLAIN_SIDE = 512  # an image is explained at most this large (the heatmap PNG has its size)

router = APIRouter(tags=["search"])


@router.get("/indices")
async def indices(served: ServedDep) -> list[dict[str, Any]]:
    """The served indexes: name, version folder served (it changes as ``mmlm index add|sync`` write new ones), counts,
    embedding size, model, searchable sides."""
    return [{"name": s.name, "version": s.version, "items": len(s.index),
             "texts": int(s.index.manifest["counts"]["texts"]), "dim": s.index.dim,
             "model": s.index.manifest["model"]["spec"],
             "weights_hash": s.index.manifest["model"]["weights_hash"],
             "modalities": sorted(s.index.manifest["indexes"]), "images": bool(s.roots),
             "runtime": s.runtime.name, "explain": s.runtime.can_explain}
            for s in served.values()]  # fmt: skip


@router.post("/search", dependencies=JSON_BODY, response_model=SearchResponse)
async def search(
    body: SearchRequest, request: Request, served: ServedDep, settings: SettingsDep, batcher: BatcherDep,
    metrics: MetricsDep,
) -> JSONResponse:  # fmt: skip
    """The ``k`` items nearest a text, an image, an embedding, a stored item or weighted ``terms`` of them, best
    first (cosine); only items matching ``where``, none scoring below ``min_score``."""
    s = pick(served, body.index)
    check_k(settings, body.k, body.offset)
    check_modality(s, body.modality)
    if body.min_score is not None and not math.isfinite(body.min_score):
        raise HTTPException(422, f"min_score {body.min_score}: give a finite number")
    selected, where = await select_ids(s, body.where, body.modality)
    if body.terms is not None:
        if any(v is not None for v in (body.text, body.image, body.embedding, body.item)):
            raise HTTPException(422, "give terms or one of text, image, embedding, item, not both")
        query = await combined_query(s, settings, metrics, batcher, body.terms)
    else:
        image = await b64decode_async(body.image) if body.image is not None else None
        query = await make_query(s, settings, metrics, body.text, image, body.embedding, body.item)
    ids, scores = await search_ids(batcher, s, query, body.modality, body.k + body.offset, body.deduplicate,
                                   selected, where, body.min_score)  # fmt: skip
    ids, scores = ids[body.offset :], scores[body.offset :]
    rows = await metadata(s, metrics, ids)
    hits = [{"id": int(i), "score": float(score), "metadata": {k: v for k, v in row.items() if k != "id"},
             "image": image_url(request, s, int(i), row)} for i, score, row in zip(ids, scores, rows)]  # fmt: skip
    return JSONResponse({"index": s.name, "modality": body.modality, "hits": hits})


@router.post("/embed", dependencies=JSON_BODY, response_model=EmbedResponse)
async def embed(
    body: EmbedRequest, served: ServedDep, settings: SettingsDep, batcher: BatcherDep, metrics: MetricsDep
) -> JSONResponse:
    """The L2-normalised embedding of a text or an image, by the model of ``index``."""
    s = pick(served, body.index)
    image = await b64decode_async(body.image) if body.image is not None else None
    answer = await batcher(await make_query(s, settings, metrics, body.text, image))
    return JSONResponse({"index": s.name, "dim": s.index.dim, "embedding": answer.vector.tolist()})


@router.get("/items/{index}/{id}")
async def item(
    index: str, id: Annotated[int, PathParam(ge=0, lt=MAX_ID)], request: Request, served: ServedDep,
    metrics: MetricsDep,
) -> dict[str, Any]:  # fmt: skip
    """An item's metadata (every column, all its captions) and its image URL."""
    s = pick(served, index)
    check_item(s, id)
    row = (await metadata(s, metrics, np.array([id])))[0]
    return {**row, "image": image_url(request, s, id, row)}


@router.post("/explain", dependencies=JSON_BODY, response_class=Response,
             responses={200: {"content": {"image/png": {}}}})  # fmt: skip
async def explain(
    body: ExplainRequest, served: ServedDep, settings: SettingsDep, explainer: ExplainerDep, metrics: MetricsDep
) -> Response:
    """PNG: the image with a heatmap of where ``text`` matches it (``mmlm.explain.heatmap_png``)."""
    s = pick(served, body.index)
    if not s.runtime.can_explain:  # before mmlm.explain is imported: it loads torch
        raise HTTPException(400, f"/explain needs the model itself; this server runs index {s.name!r} through "
                                 f"{s.runtime.name}: serve it with --runtime torch")  # fmt: skip
    from mmlm.explain import METHODS

    if body.method is not None and body.method not in METHODS:
        raise HTTPException(422, f"method {body.method[:50]!r}: use one of {', '.join(METHODS)}")
    if not body.text.strip() or len(body.text) > settings.max_text:
        raise HTTPException(422, f"text: give 1 to {settings.max_text:,} characters")
    if (body.image is None) == (body.item is None):
        raise HTTPException(422, "give exactly one of image, item")
    picture = await explained_picture(body, s, settings, metrics)
    # on the explainer's thread, with the explainer's model: a slow map never delays a search batch
    png = await explainer(s.runtime.explain, picture, body.text, body.method)
    return Response(png, media_type="image/png")


@router.post("/caption", dependencies=JSON_BODY, response_model=CaptionResponse)
async def caption(
    body: CaptionRequest, served: ServedDep, settings: SettingsDep, explainer: ExplainerDep, metrics: MetricsDep
) -> dict[str, Any]:
    """What is in an image, in words, by the served model when it is a CoCa (``mmlm caption``'s decoding)."""
    s = pick(served, body.index)
    if not s.runtime.can_caption:
        raise HTTPException(400, f"index {s.name!r} is served with a model that cannot caption (a CoCa can, "
                                 "through --runtime torch)")  # fmt: skip
    if (body.image is None) == (body.item is None):
        raise HTTPException(422, "give exactly one of image, item")
    picture = await explained_picture(body, s, settings, metrics)
    # on the explainer's thread: a caption is many decoder passes, which must not delay a search batch
    text = await explainer(s.runtime.caption, picture, body.max_new_tokens, body.num_beams)
    return {"caption": text, "index": s.name}


async def explained_picture(
    body: ExplainRequest | CaptionRequest, s: Served, settings: Settings, metrics: Metrics
) -> Image.Image:
    """The uploaded image or the stored item's file, decoded and shrunk to ``EXPLAIN_SIDE`` on a pool thread."""
    if body.image is not None:
        data = await b64decode_async(body.image)
        picture = await run_in_threadpool(read_image, data, settings.max_pixels)
    else:
        check_item(s, body.item)  # type: ignore[arg-type]
        row = (await metadata(s, metrics, np.array([body.item])))[0]
        path = await run_in_threadpool(s.image_file, body.item, row)
        if path is None:
            raise HTTPException(404, f"no image file for item {body.item} of {s.name!r} on this server")
        loaded = await run_in_threadpool(load_image, str(path))
        if isinstance(loaded, Skip):
            raise HTTPException(404, f"item {body.item}: {loaded.reason.replace('_', ' ')}")
        picture = loaded
    await run_in_threadpool(picture.thumbnail, (EXPLAIN_SIDE, EXPLAIN_SIDE))
    return picture
