"""The FastAPI app of ``mmlm serve``, assembled: routers, middleware, and a lifespan that starts the model
worker and always closes what the app holds.

::

    request ─► CORS ─► metrics ─► API key ─► body size, content type ─► route (routers/)
                                                                          │ image: base64 -> header checked -> decoded,
                                                                          ▼ transformed (a pool thread)
    Batcher (batcher.py): one supervised model thread micro-batches queries through the models and FAISS;
    Explainer (explainer.py): /explain on a thread of its own; metadata from SQLite; answers as JSON
    Reloader (reload.py): a new version of an index (add, sync) served without a restart
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

import mmlm
from mmlm.serve.batcher import Batcher, Query
from mmlm.serve.explainer import Explainer
from mmlm.serve.metrics import Metrics, MetricsMiddleware
from mmlm.serve.reload import GRACE_EXTRA, Reloader
from mmlm.serve.routers import clip_retrieval, search, service
from mmlm.serve.security import ApiKeyMiddleware, BodyLimitMiddleware, PlainTextJsonMiddleware
from mmlm.serve.served import Served
from mmlm.serve.settings import Settings

DESCRIPTION = """
Image-text search over indexes built by `mmlm index build`.

- **Own routes**: `POST /search` (text, image, embedding or a stored item -> nearest items),
  `POST /embed`, `GET /indices`, `GET /items/{index}/{id}` (+ `/image`: the file, or a digit's pixels as PNG),
  `POST /explain` (heatmap PNG), `POST /caption` (what is in a picture, when the index's model is a CoCa).
- **clip-retrieval routes**: `POST /knn-service`, `GET /indices-list`, `POST /metadata`, with its request and
  response schema, so its `ClipClient` and web front end work unchanged. `use_safety_model`,
  `use_violence_detector`, `use_mclip`, `aesthetic_score` and `aesthetic_weight` are accepted and ignored:
  this server has no safety, violence, multilingual or aesthetic models. An `image_url` naming this server's
  own `/items/{index}/{id}/image` searches by the item's stored embedding; any other is refused unless the
  server was started with `--image_url_allow`. With `--clip_front`, clip-retrieval's web front end itself is
  at `/clip-front/`, pointed at this server.
- JSON bodies may come without a `Content-Type` (as `ClipClient` sends them); any type other than JSON is
  refused (415). Every refusal is a 4xx JSON `{"detail": message}`.
- With an API key, every route but `/healthz` and the page itself needs it: header `X-API-Key: KEY`,
  `Authorization: Bearer KEY`, or `?api_key=KEY` (for clients that cannot set headers, such as `ClipClient`).
- Every query has a deadline (504 past it); `/healthz` answers 503, and queries 503 at once, if the model
  worker has stopped.
- A new version of an index (`mmlm index add`, `mmlm index sync`) is served within a second or two, without a
  restart and without failing a query; `/indices` names the version each index serves.
"""


async def warm_up(batcher: Batcher, served: dict[str, Served]) -> None:
    """One text and one image through each model, so the first request does not pay for it (not the image where
    the runtime loads its image encoder on first use: warming it would load it)."""
    firsts = {id(s.runtime): s for s in served.values()}.values()
    for s in firsts:
        size = s.runtime.image_size
        await batcher(Query(s, text="warm up"))  # one at a time: a queue of one place must take them too
        if not s.runtime.image_on_first_use:
            await batcher(Query(s, pixels=np.zeros((3, size, size), np.float32)))


def create_app(settings: Settings, served: dict[str, Served]) -> FastAPI:
    """The app serving ``served`` (``open_indexes``; the first is the default of requests that name none) as
    ``settings`` say. The app owns them from here: its lifespan closes them when it ends, however it ends."""
    if not served:
        raise ValueError("give at least one index to serve")
    metrics = Metrics()
    batcher = Batcher(metrics, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue,
                      settings.worker_threads, settings.query_timeout_s)  # fmt: skip
    explainer = Explainer(settings.explain_timeout_s)
    reloader = Reloader(served, settings.reload_s, settings.query_timeout_s + GRACE_EXTRA)
    metrics.worker_up.set_function(lambda: float(batcher.trouble() is None))  # read at each scrape

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await batcher.start()
            await warm_up(batcher, served)
            reloader.start()
            yield
        finally:
            await reloader.stop()
            await batcher.stop()
            explainer.close()
            for s in served.values():
                s.index.close()

    app = FastAPI(title="mmlm retrieval API", version=mmlm.__version__, description=DESCRIPTION, lifespan=lifespan,
                  strict_content_type=False)  # fmt: skip
    app.state.settings, app.state.served = settings, served
    app.state.metrics, app.state.batcher, app.state.explainer = metrics, batcher, explainer
    app.state.reloader = reloader
    app.include_router(service.router)
    app.mount("/static", StaticFiles(directory=service.STATIC), name="static")
    app.include_router(search.router)
    app.include_router(clip_retrieval.router)
    if settings.clip_front is not None:  # its config.json route first: it answers in place of the wheel's file
        app.include_router(clip_retrieval.front)
        app.mount(clip_retrieval.FRONT, StaticFiles(directory=settings.clip_front, html=True), name="clip_front")
    # added innermost first: a request meets CORS, then metrics, then the key, then the body checks
    app.add_middleware(PlainTextJsonMiddleware, paths=clip_retrieval.POSTS)
    app.add_middleware(BodyLimitMiddleware, max_body=settings.max_body)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"], max_age=600)  # fmt: skip
    return app
