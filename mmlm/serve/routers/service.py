"""What serves the service rather than a search: ``/healthz`` (the truth about the model worker), ``/metrics``
(Prometheus), the web page at ``/`` and the items' images (their files, or their rendered pixels)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mmlm.serve.deps import BatcherDep, MetricsDep, ServedDep, check_item, pick
from mmlm.serve.images import render_png
from mmlm.serve.queries import metadata
from mmlm.serve.schemas import MAX_ID

STATIC = Path(__file__).parents[1] / "static"
# the page loads its script and style from this server only, and images from it or the user's own drop
PAGE_CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})


@router.get("/healthz", tags=["service"], responses={503: {"description": "the model worker is not running"}})
async def healthz(served: ServedDep, batcher: BatcherDep) -> Any:
    """Liveness: 200 while the model worker can answer queries, 503 with the reason once it cannot (no API key
    needed)."""
    if (why := batcher.trouble()) is not None:
        return JSONResponse({"status": "unavailable", "detail": why, "indexes": len(served)}, 503)
    return {"status": "ok", "indexes": len(served)}


@router.get("/metrics", tags=["service"], response_class=Response)
async def prometheus(metrics: MetricsDep) -> Response:
    """Prometheus text: requests and latency per route, time per stage, batch sizes, queue depth."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/items/{index}/{id}/image", tags=["search"], name="item_image", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})  # fmt: skip
async def item_image(
    index: str, id: Annotated[int, PathParam(ge=0, lt=MAX_ID)], served: ServedDep, metrics: MetricsDep
) -> Response:
    """The item's image file, served only from inside the folder its index was built from; for an item
    without a file but with pixels (a ``digits`` index), those pixels as a PNG."""
    s = pick(served, index)
    check_item(s, id)
    row = (await metadata(s, metrics, np.array([id])))[0]
    path = await run_in_threadpool(s.image_file, id, row)
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"}
    if path is not None:
        return FileResponse(path, headers=headers)
    if (png := await run_in_threadpool(render_png, s, id, row)) is not None:
        return Response(png, media_type="image/png", headers=headers)
    raise HTTPException(404, f"no image file for item {id} of {s.name!r} on this server")
