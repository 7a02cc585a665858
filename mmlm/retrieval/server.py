"""The retrieval API of ``mmlm serve``: FastAPI routes over index folders that ``mmlm index`` built.

::

    request ─► CORS ─► metrics ─► API key ─► body size, content type, fields ─► route
                                                                                  │ image: base64 -> header checked
                                                                                  │ (format, pixels) -> decoded,
                                                                                  ▼ transformed: "decode" (a pool thread)
    Batcher (one model thread, a thread-safe queue): the queries queued together, up to ``max_batch``, go
    through each model in one forward pass ("encode") and through each FAISS index in one search
    ("search"); metadata comes from SQLite ("metadata"), results go out as JSON

Routes: mmlm's own (``/search``, ``/embed``, ``/indices``, ``/items/...``, ``/explain``), clip-retrieval's
(``/knn-service``, ``/indices-list``, ``/metadata``: its ``ClipClient`` and front end work unchanged),
``/healthz``, ``/metrics`` (Prometheus) and the web page at ``/``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import http.client
import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn
from torchvision.datasets.folder import IMG_EXTENSIONS

import mmlm
from mmlm.data import image_transform
from mmlm.data.skips import DECOMPRESSION_BOMB, Skip, load_image
from mmlm.data.tokenizers import Tokenizer
from mmlm.paths import ASSETS, resolve
from mmlm.retrieval.collection import BUNDLED
from mmlm.retrieval.index import Index

STATIC = Path(__file__).parent / "static"
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # decoders exposed to uploads (no TIFF, PSD, ...)
DEDUP_THRESHOLD = 0.94  # clip-retrieval's: two results this close (cosine of image embeddings) are one picture
DEDUP_LIMIT = 1000  # results compared for duplicates: n^2 similarities
EXPLAIN_SIDE = 512  # an image is explained at most this large (the heatmap PNG has its size)
CLIP_POSTS = ("/knn-service", "/metadata")  # clip-retrieval's POST routes
OPEN_PATHS = ("/healthz", "/", "/static/")  # no API key: the page and its script hold no data
NAME = re.compile(r"[A-Za-z0-9._-]+")  # an index name is a URL path segment
MAX_ID = 2**63  # SQLite integers: a larger id is refused before it reaches the database
BLAS_FROM = 2  # queries of one FAISS exact search from which it goes through BLAS (see compute_settings)
INLINE_ROWS = 64  # metadata rows read on the event loop (by primary key, well under a millisecond)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

log = logging.getLogger("mmlm.serve")

DESCRIPTION = """
Image-text search over indexes built by `mmlm index build`.

- **Own routes**: `POST /search` (text, image, embedding or a stored item -> nearest items),
  `POST /embed`, `GET /indices`, `GET /items/{index}/{id}` (+ `/image`), `POST /explain` (heatmap PNG).
- **clip-retrieval routes**: `POST /knn-service`, `GET /indices-list`, `POST /metadata`, with its request and
  response schema, so its `ClipClient` and web front end work unchanged. `use_safety_model`,
  `use_violence_detector`, `use_mclip`, `aesthetic_score` and `aesthetic_weight` are accepted and ignored:
  this server has no safety, violence, multilingual or aesthetic models. `image_url` is refused unless the
  server was started with `--image_url_allow`.
- JSON bodies may come without a `Content-Type` (as `ClipClient` sends them); any type other than JSON is
  refused (415). Every refusal is a 4xx JSON `{"detail": message}`.
- With an API key, every route but `/healthz` and the page itself needs it: header `X-API-Key: KEY`,
  `Authorization: Bearer KEY`, or `?api_key=KEY` (for clients that cannot set headers, such as `ClipClient`).
"""


# ------------------------------------------------------------------------------ models and indexes


@dataclass(frozen=True)
class Limits:
    """What one request may ask; a request over any of them is refused with a 4xx and a message."""

    max_body: int = 10 * 2**20  # bytes of a request body (base64 makes an image file 4/3 larger)
    max_pixels: int = 25_000_000  # width x height of an uploaded image, read from its header before decoding
    max_text: int = 1000  # characters of a text query (a CLIP reads its first 77 tokens anyway)
    max_k: int = 10_000  # results of one query: k + offset, clip-retrieval's num_result_ids


class Engine:
    """One model, as the indexes built with it need it: tokenizer, eval transform, encoders in inference mode.

    ``int8``: queries go through an int8 copy (``mmlm.compress.quantize_int8``, CPU); ``model`` stays
    float32 for ``/explain``, whose gradients int8 layers do not have.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: str | torch.device, int8: bool = False) -> None:
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, torch.device(device)
        if int8:
            from mmlm.compress import quantize_int8

            self.encoder = quantize_int8(self.model)
        else:
            self.encoder = self.model
        self.transform = image_transform(model.cfg.vision, train=False)
        self.dim = int(model.cfg.embed_dim)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts)
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        return self.encoder.encode_text(ids, mask).float().cpu().numpy()

    @torch.inference_mode()
    def encode_image(self, pixels: list[torch.Tensor]) -> np.ndarray:
        return self.encoder.encode_image(torch.stack(pixels).to(self.device)).float().cpu().numpy()


@dataclass
class Served:
    """An index under its name, the model that embeds its queries, and where its image files are."""

    name: str
    index: Index
    engine: Engine
    roots: list[tuple[int, int, Path, str]]  # per build that read image files: first id, last id, folder, column
    lock: threading.Lock = field(default_factory=threading.Lock)  # one SQLite connection, one thread at a time

    def metadata(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        with self.lock:
            return self.index.metadata(np.asarray(ids, dtype=np.int64))

    def has_image(self, item: int, meta: dict[str, Any]) -> bool:
        return any(first <= item <= last and isinstance(meta.get(key), str) for first, last, _, key in self.roots)

    def image_file(self, item: int, meta: dict[str, Any]) -> Path | None:
        """The item's image file, only if it lies inside the folder its build read (symlinks resolved)."""
        for first, last, root, key in self.roots:
            if first <= item <= last and isinstance(meta.get(key), str):
                path = (root / meta[key]).resolve()
                ok = path.is_relative_to(root) and path.suffix.lower() in IMG_EXTENSIONS and path.is_file()
                return path if ok else None
        return None


def data_root(data: str) -> Path | None:
    """The folder a build's image paths are relative to: the image folder it read, or its manifest's
    folder; None for data without image files (shards, digits) or no longer there."""
    path = ASSETS if data == BUNDLED else resolve(data)
    if path.is_dir():
        return path.resolve()
    if path.is_file() and path.suffix.lower() not in (".tar", ".tgz", ".gz"):
        return path.parent.resolve()
    return None


def index_names(indexes: Mapping[str, Any] | Sequence[Any]) -> dict[str, Index]:
    """``{name: Index}`` from a mapping, or from folders (named by their last part) and ``name=DIR`` strings."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(indexes, Mapping):
        pairs = list(indexes.items())
    else:
        for entry in indexes:
            if isinstance(entry, Index):
                pairs.append((entry.folder.resolve().name, entry))
                continue
            name, sep, folder = str(entry).partition("=")
            pairs.append((name, folder) if sep and NAME.fullmatch(name) else (Path(entry).resolve().name, entry))
    if not pairs:
        raise ValueError("give at least one index folder to serve (`mmlm index build` writes one)")
    out: dict[str, Index] = {}
    for name, value in pairs:
        if not NAME.fullmatch(name):
            raise ValueError(f"index name {name!r}: use letters, digits, '.', '_' and '-' (name it with NAME=DIR)")
        if name in out:
            raise ValueError(f"two indexes named {name!r}: name them apart with NAME=DIR")
        out[name] = value if isinstance(value, Index) else Index.open(value)
    return out


def open_indexes(
    indexes: Mapping[str, Any] | Sequence[Any], model: str | nn.Module | None = None, device: str = "cpu",
    int8: bool = False,
) -> dict[str, Served]:  # fmt: skip
    """Each index with the model its manifest names (one Engine per model and tokenizer), refused unless the
    model's weights hash is the one the index was built with (``mmlm.retrieval.model.built_with``). ``model``:
    where that model is now, if it moved; ``int8``: encode queries with an int8 copy of it (as they are
    anyway for an index embedded in int8)."""
    from mmlm.retrieval.model import built_with

    named = index_names(indexes)
    engines: dict[tuple, Engine] = {}
    served: dict[str, Served] = {}
    for name, index in named.items():
        built = index.manifest["model"]
        quantized = int8 or bool(built.get("int8", False))
        key = (id(model) if isinstance(model, nn.Module) else model, built["spec"], built["act"], built["seed"],
               built["tokenizer"], built["weights_hash"], quantized)  # fmt: skip
        if key not in engines:
            # loaded in float32 whatever the index: /explain needs gradients, which int8 layers do not have
            loaded = built_with({**built, "int8": False}, index.folder, model, device)
            engines[key] = Engine(loaded.model, loaded.require_tokenizer(), device, quantized)
        roots = [(b["ids"][0], b["ids"][1], root, b["image_key"]) for b in index.manifest["builds"]
                 if b["ids"] and (root := data_root(b["data"])) is not None]  # fmt: skip
        served[name] = Served(name, index, engines[key], roots)
    return served


# ------------------------------------------------------------------------------ metrics


class Metrics:
    """Prometheus series of one app (its own registry: several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmlm_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=self.registry)  # fmt: skip
        self.latency = Histogram("mmlm_http_request_duration_seconds", "Request to last response byte, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.stages = Histogram(
            "mmlm_stage_duration_seconds",
            "Time in each stage of a query: decode (per image), queue (per query), encode and search (per batch), "
            "metadata (per request)",
            ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch = Histogram("mmlm_batch_size", "Queries per model and FAISS batch",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)  # fmt: skip
        self.queue = Gauge("mmlm_queue_depth", "Queries waiting for the model thread", registry=self.registry)

    def stage(self, name: str, seconds: float) -> None:
        self.stages.labels(name).observe(seconds)


class MetricsMiddleware:
    """Counts every request and its latency under its route's template (``/items/{index}/{id}``), so
    the series stay few whatever paths clients make up."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def route(self, scope: Scope) -> str:
        """The route the router chose (it leaves it in the scope), else the one that would have answered
        a request refused before routing (401, 413)."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = self.route(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def route_path(scope: Scope) -> str:
    """The path the routes see: without the prefix a reverse proxy serves the app under."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """Every route but ``OPEN_PATHS`` needs the key: ``X-API-Key``, ``Authorization: Bearer`` or ``?api_key=``.
    CORS preflights (OPTIONS) pass: browsers send them without credentials."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    def allowed(self, scope: Scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None:
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key", [None])[0]
        return given is not None and hmac.compare_digest(given.encode(), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        public = path in OPEN_PATHS or path.startswith(OPEN_PATHS[-1])
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or public or self.allowed(scope):
            return await self.app(scope, receive, send)
        detail = "this server needs an API key: header X-API-Key or Authorization: Bearer, or ?api_key="
        await JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class BodyLimitMiddleware:
    """A body over ``max_body`` bytes gets a JSON 413: at once when its Content-Length says so, else as soon
    as the bytes streamed in pass the limit."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"request body over {self.max_body:,} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await JSONResponse({"detail": detail}, 413)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, detail)  # FastAPI answers it as any HTTPException: JSON
            return message

        await self.app(scope, limited, send)


class PlainTextJsonMiddleware:
    """clip-retrieval's front end posts its JSON as text/plain (what ``fetch`` sends with a string body)
    and its Flask back end reads any body as JSON; on its routes, text/plain is taken as JSON too."""

    def __init__(self, app: ASGIApp, paths: Sequence[str]) -> None:
        self.app, self.paths = app, set(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope) in self.paths:
            kind = dict(scope["headers"]).get(b"content-type", b"")
            if kind.split(b";")[0].strip().lower() == b"text/plain":
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class RedactApiKey(logging.Filter):
    """Keeps ``?api_key=...`` out of uvicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and "api_key=" in str(record.args[2]):
            args = list(record.args)
            args[2] = re.sub(r"api_key=[^&\s]*", "api_key=<redacted>", str(args[2]))
            record.args = tuple(args)
        return True


# ------------------------------------------------------------------------------ micro-batching


def compute_settings(threads: int) -> None:
    """torch's and FAISS's threads, set in the model thread (FAISS reads OpenMP's count per calling thread),
    and FAISS's exact search through BLAS from ``BLAS_FROM`` queries: FAISS 1.15 scores up to 128,000
    queries one by one, each reading the whole index, where one matrix product reads it once per batch
    (100k x 512: 10 ms a query one by one, 1.4 ms in a batch of 64; scripts/bench.py --only query)."""
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM


def default_threads() -> int:
    """One core fewer than the machine has, at least one: the HTTP side keeps a core, and OpenMP threads
    beyond the free cores spin-wait and starve it (a 2-core text query: ~130 ms with 2 threads, ~3 ms with 1)."""
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass
class Query:
    """One query for the model thread: an input (text, pixels or a vector) and what to search, if anything."""

    served: Served
    text: str | None = None
    pixels: torch.Tensor | None = None
    vector: np.ndarray | None = None
    modality: str | None = None  # the side to search; None: only the embedding is wanted
    k: int = 0
    future: asyncio.Future | None = None
    queued: float = 0.0


@dataclass
class Answer:
    vector: np.ndarray
    ids: np.ndarray | None = None
    scores: np.ndarray | None = None


@dataclass
class Call:
    """A function for the model thread between two batches (warm-up, ``/explain``)."""

    fn: Any
    future: asyncio.Future


class Batcher:
    """Queries that arrive together share forward passes and FAISS searches.

    One thread runs the models (a second would only fight the first for the cores), fed by a
    thread-safe queue: whatever queued while it was busy becomes the next batch, up to ``max_batch``;
    after a batch of more than one (the server is busy) it waits ``max_wait`` seconds at most for
    more. Answers go back to the event loop in one call per batch. A full queue is refused (429).
    """

    def __init__(
        self, metrics: Metrics, max_batch: int = 64, max_wait: float = 0.002, max_queue: int = 1024, threads: int = 1
    ) -> None:  # fmt: skip
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("threads", threads)):
            if value < 1:
                raise ValueError(f"{name}={value}: give a number >= 1")
        self.metrics, self.max_batch, self.max_wait, self.max_queue = metrics, max_batch, max(0.0, max_wait), max_queue
        self.queue: queue.Queue[Query | Call | None] = queue.Queue(max_queue)
        self.thread = threading.Thread(target=self._work, args=(threads,), name="mmlm-model", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread.start()

    async def stop(self) -> None:
        self.queue.put(None)
        await asyncio.to_thread(self.thread.join)

    async def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the model thread, between batches."""
        return await self._submit(Call(partial(fn, *args), asyncio.get_running_loop().create_future()))

    async def __call__(self, query: Query) -> Answer:
        query.future, query.queued = asyncio.get_running_loop().create_future(), time.perf_counter()
        return await self._submit(query)

    async def _submit(self, item: Query | Call) -> Any:
        assert self.loop is not None, "the app's lifespan starts the batcher"
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            raise HTTPException(429, f"busy: {self.max_queue} queries waiting; retry shortly",
                                headers={"Retry-After": "1"}) from None  # fmt: skip
        return await item.future  # type: ignore[misc]

    @staticmethod
    def _resolve(outcomes: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
        """On the event loop: the answers of a batch (a client gone has its future cancelled)."""
        for future, result, error in outcomes:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)

    def _reply(self, futures: list[asyncio.Future], results: list[Any], error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(self._resolve, [(f, r, error) for f, r in zip(futures, results)])  # type: ignore[union-attr]

    def _call(self, call: Call) -> None:
        try:
            self._reply([call.future], [call.fn()])
        except Exception as e:  # noqa: BLE001 -- the caller's request fails, not the thread
            self._reply([call.future], [None], e)

    def _drain(self, batch: list[Query], calls: list[Call]) -> bool:
        """Queued queries into ``batch`` (calls aside, for after it); False once told to stop."""
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            (calls if isinstance(item, Call) else batch).append(item)  # type: ignore[arg-type]
        return True

    def _work(self, threads: int) -> None:
        compute_settings(threads)
        busy, running = False, True
        while running:
            item = self.queue.get()
            if item is None:
                return
            batch: list[Query] = []
            calls: list[Call] = []
            (calls if isinstance(item, Call) else batch).append(item)  # type: ignore[arg-type]
            running = self._drain(batch, calls)
            if running and busy and batch and len(batch) < self.max_batch and self.max_wait > 0:
                time.sleep(self.max_wait)
                running = self._drain(batch, calls)
            self.metrics.queue.set(self.queue.qsize())
            batch = [q for q in batch if not q.future.done()]  # type: ignore[union-attr]  # clients gone
            busy = len(batch) > 1
            if batch:
                futures = [q.future for q in batch]
                try:
                    self._reply(futures, self._run(batch))  # type: ignore[arg-type]
                except Exception as e:  # a failed batch fails its requests, not the server
                    log.exception("batch of %d queries failed", len(batch))
                    self._reply(futures, [None] * len(batch), e)  # type: ignore[arg-type]
            for call in calls:
                self._call(call)

    def _run(self, batch: list[Query]) -> list[Answer]:
        start = time.perf_counter()
        for q in batch:
            self.metrics.stage("queue", start - q.queued)
        self.metrics.batch.observe(len(batch))
        vectors: list[np.ndarray | None] = [q.vector for q in batch]
        texts: dict[Engine, list[int]] = defaultdict(list)
        images: dict[Engine, list[int]] = defaultdict(list)
        for i, q in enumerate(batch):
            if q.text is not None:
                texts[q.served.engine].append(i)
            elif q.pixels is not None:
                images[q.served.engine].append(i)
        for engine, rows in texts.items():
            self._encode(vectors, rows, engine.encode_text, [batch[i].text for i in rows])
        for engine, rows in images.items():
            self._encode(vectors, rows, engine.encode_image, [batch[i].pixels for i in rows])
        answers = [Answer(v) for v in vectors]  # type: ignore[arg-type]
        searches: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, q in enumerate(batch):
            if q.modality is not None:
                searches[(q.served.name, q.modality)].append(i)
        for (_, modality), rows in searches.items():
            t = time.perf_counter()
            k = max(batch[i].k for i in rows)
            ids, scores = batch[rows[0]].served.index.search(np.stack([vectors[i] for i in rows]), k, modality)
            for row, i in enumerate(rows):
                found = ids[row, : batch[i].k] >= 0  # FAISS pads with -1 where fewer exist
                answers[i].ids, answers[i].scores = ids[row, : batch[i].k][found], scores[row, : batch[i].k][found]
            self.metrics.stage("search", time.perf_counter() - t)
        return answers

    def _encode(self, vectors: list[np.ndarray | None], rows: list[int], encode: Any, inputs: list[Any]) -> None:
        start = time.perf_counter()
        for i, vector in zip(rows, encode(inputs)):
            vectors[i] = vector
        self.metrics.stage("encode", time.perf_counter() - start)


# ------------------------------------------------------------------------------ requests


class SearchRequest(BaseModel):
    """Exactly one of ``text``, ``image``, ``embedding``, ``item``."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="a text query")
    image: str | None = Field(None, description="an image file, base64 (a data: URL too)")
    embedding: list[float] | None = Field(None, description="a query vector of the index's dimension")
    item: int | None = Field(None, ge=0, lt=MAX_ID, description="search by this item's stored image embedding")
    modality: Literal["image", "text"] = Field("image", description="which side to search: images or captions")
    k: int = Field(10, ge=1, description="results wanted")
    offset: int = Field(0, ge=0, description="results to skip (paging)")
    index: str | None = Field(None, description="index name; default: the first served")
    deduplicate: bool = Field(False, description="drop results whose image is a near copy of a better one")


class EmbedRequest(BaseModel):
    """Exactly one of ``text``, ``image``."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="an image file, base64 (a data: URL too)")
    index: str | None = Field(None, description="whose model embeds it; default: the first index")


class ExplainRequest(BaseModel):
    """Where ``text`` matches an image: ``image`` (base64) or a stored ``item``."""

    model_config = ConfigDict(extra="forbid")
    text: str
    image: str | None = None
    item: int | None = Field(None, ge=0, lt=MAX_ID)
    index: str | None = None
    method: str | None = Field(None, description="one of mmlm.explain.METHODS; default: heatmap_png's")


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` body, as its ``ClipClient`` and front end send it."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = Field(None, description="base64 of an image file")
    image_url: str | None = Field(None, description="fetched only from addresses the server allows")
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, description="results with their metadata")
    num_result_ids: int | None = Field(None, ge=1, description="results in all (ids and similarities)")
    indice_name: str | None = None
    deduplicate: bool = False
    use_safety_model: bool = Field(False, description="accepted and ignored")
    use_violence_detector: bool = Field(False, description="accepted and ignored")
    use_mclip: bool = Field(False, description="accepted and ignored")
    aesthetic_score: int | float | str | None = Field(None, description="accepted and ignored")
    aesthetic_weight: int | float | str | None = Field(None, description="accepted and ignored")


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    indice_name: str | None = None
    ids: list[Annotated[int, Field(ge=0, lt=MAX_ID)]]


class Hit(BaseModel):
    id: int
    score: float
    metadata: dict[str, Any]
    image: str | None = Field(None, description="URL of the item's image file, when the server has it")


class SearchResponse(BaseModel):
    index: str
    modality: str
    hits: list[Hit]


class EmbedResponse(BaseModel):
    index: str
    dim: int
    embedding: list[float]


def json_body(request: Request) -> None:
    """A JSON body: ``application/json`` (or ``+json``), or no type at all, as clip-retrieval's client sends it."""
    kind = request.headers.get("content-type")
    if kind is None:
        return
    media = kind.split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise HTTPException(415, f"send the body as JSON (Content-Type: application/json), not {kind[:100]!r}")


def b64decode(text: str) -> bytes:
    if text.startswith("data:"):  # a data URL, as browsers' FileReader makes them
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "image: not valid base64") from None


def read_image(data: bytes, limits: Limits) -> Image.Image:
    """The uploaded image, its format and pixel count checked from the header before a pixel is decoded."""
    try:
        with Image.open(BytesIO(data), formats=IMAGE_FORMATS) as probe:
            width, height = probe.size
    except UnidentifiedImageError:
        raise HTTPException(415, f"image: not a file in a format this server reads ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as e:  # Pillow refuses to open past twice its own pixel limit
        raise HTTPException(413, f"image: {e}") from None
    except Exception as e:  # noqa: BLE001 -- any parser failure on a header is the upload's fault
        raise HTTPException(400, f"image: unreadable header ({type(e).__name__}: {e})") from None
    if width * height > limits.max_pixels:
        raise HTTPException(413, f"image of {width}x{height} = {width * height:,} pixels; "
                                 f"the limit is {limits.max_pixels:,}")  # fmt: skip
    image = load_image(data, "upload")
    if isinstance(image, Skip):
        status = 413 if image.reason == DECOMPRESSION_BOMB else 400
        raise HTTPException(status, f"image: {image.reason.replace('_', ' ')} ({image.detail[:200]})")
    return image


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


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a redirect could leave the allowed addresses
        return None


def fetch_image(url: str, allow: Sequence[str], max_bytes: int) -> bytes:
    """``image_url``'s bytes, only from an address that starts with an allowed one (same scheme, host and
    port, path prefix), without redirects: the server must not become a proxy into its own network."""
    parts = urlsplit(url)
    inside = any(parts.scheme == a.scheme and parts.netloc == a.netloc and parts.path.startswith(a.path)
                 for a in map(urlsplit, allow))  # fmt: skip
    climbs = any(segment in (".", "..") for segment in unquote(parts.path).split("/"))  # back out of the prefix
    if not inside or climbs or parts.scheme not in ("http", "https"):
        why = "is off on this server" if not allow else f"may only name addresses under {', '.join(allow)}"
        raise HTTPException(403, f"image_url {why}; send the image itself (base64 in 'image')")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"mmlm-serve/{mmlm.__version__}"})
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # InvalidURL: a space, \r\n
        raise HTTPException(400, f"image_url: could not fetch it ({e})") from None
    if len(data) > max_bytes:
        raise HTTPException(413, f"image_url: larger than {max_bytes:,} bytes")
    return data


# ------------------------------------------------------------------------------ the app


def create_app(
    indexes: Mapping[str, Any] | Sequence[Any],
    model: str | nn.Module | None = None,
    *,
    device: str = "cpu",
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    image_url_allow: Sequence[str] = (),
    limits: Limits = Limits(),
    max_batch: int = 64,
    max_wait_ms: float = 2.0,
    max_queue: int = 1024,
    threads: int | None = None,
    int8: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``indexes`` (``{name: folder or Index}``, or folders / ``name=DIR``).

    Args:
        indexes: what to serve; the first is the default of requests that name none.
        model: the indexes' model where it is now (a spec or a module), if not at the spec they name.
        device: where the models run.
        api_key: required on every route but ``/healthz`` and the page, when given.
        cors_origins: origins whose pages may call the API from a browser (``*``: any).
        image_url_allow: address prefixes ``image_url`` may name; none: ``image_url`` is refused.
        limits: what one request may ask.
        max_batch: queries per forward pass at most.
        max_wait_ms: when busy, how long a batch waits for more queries at most.
        max_queue: queries waiting at most; more are refused with 429.
        threads: torch and FAISS threads of the model thread; default: ``default_threads()``.
        int8: encode queries with an int8 copy of the model (CPU; the index stays as built).
    """
    served = open_indexes(indexes, model, device, int8)
    first = next(iter(served))
    metrics = Metrics()
    batcher = Batcher(metrics, max_batch, max_wait_ms / 1000, max_queue, threads or default_threads())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        for engine in {s.engine for s in served.values()}:  # the first request should not pay for warm-up
            size = engine.model.cfg.vision.image_size
            await batcher.run(engine.encode_text, ["warm up"])
            await batcher.run(engine.encode_image, [torch.zeros(3, size, size)])
        yield
        await batcher.stop()
        for s in served.values():
            s.index.close()

    app = FastAPI(title="mmlm retrieval API", version=mmlm.__version__, description=DESCRIPTION, lifespan=lifespan,
                  strict_content_type=False)  # fmt: skip
    app.state.served, app.state.metrics, app.state.batcher = served, metrics, batcher
    app.add_middleware(PlainTextJsonMiddleware, paths=CLIP_POSTS)
    app.add_middleware(BodyLimitMiddleware, max_body=limits.max_body)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"], max_age=600)  # fmt: skip
    posts = [Depends(json_body)]

    def pick(name: str | None) -> Served:
        if name is None:
            return served[first]
        if name not in served:
            raise HTTPException(404, f"no index {name[:100]!r}; this server has {', '.join(served)}")
        return served[name]

    def check_k(k: int, offset: int = 0, what: str = "k") -> None:
        if k < 1 or k + offset > limits.max_k:
            raise HTTPException(422, f"{what}={k}, offset={offset}: need {what} >= 1 and {what} + offset "
                                     f"<= {limits.max_k}")  # fmt: skip

    def check_modality(s: Served, modality: str) -> None:
        if modality not in s.index.manifest["indexes"]:
            raise HTTPException(400, f"index {s.name!r} has no {modality} embeddings to search")

    def check_item(s: Served, item: int) -> None:
        if not 0 <= item < len(s.index):
            raise HTTPException(404, f"index {s.name!r} has no item {item} (ids 0 to {len(s.index) - 1})")

    async def decode(s: Served, data: bytes) -> torch.Tensor:
        start = time.perf_counter()
        pixels = await run_in_threadpool(lambda: s.engine.transform(read_image(data, limits)))
        metrics.stage("decode", time.perf_counter() - start)
        return pixels

    async def make_query(
        s: Served, text: str | None = None, image: bytes | None = None, vector: list[float] | None = None,
        item: int | None = None,
    ) -> Query:  # fmt: skip
        given = [name for name, v in (("text", text), ("image", image), ("embedding", vector), ("item", item))
                 if v is not None]  # fmt: skip
        if len(given) != 1:
            raise HTTPException(422, f"give exactly one of text, image, embedding, item (got {', '.join(given) or 'none'})")
        if text is not None:
            if not text.strip():
                raise HTTPException(422, "text: empty")
            if len(text) > limits.max_text:
                raise HTTPException(422, f"text of {len(text):,} characters; the limit is {limits.max_text:,}")
            return Query(s, text=text)
        if image is not None:
            return Query(s, pixels=await decode(s, image))
        if vector is not None:
            return Query(s, vector=check_vector(vector, s.index.dim, s.name))
        check_item(s, item)  # type: ignore[arg-type]
        return Query(s, vector=np.asarray(s.index.embeddings("image")[item], dtype=np.float32))

    async def metadata(s: Served, ids: np.ndarray) -> list[dict[str, Any]]:
        start = time.perf_counter()
        if len(ids) <= INLINE_ROWS and s.lock.acquire(blocking=False):  # cheaper than a hop to a thread
            try:
                rows = s.index.metadata(ids)
            finally:
                s.lock.release()
        else:
            rows = await run_in_threadpool(s.metadata, ids.tolist())
        metrics.stage("metadata", time.perf_counter() - start)
        return [row or {} for row in rows]

    def image_url(request: Request, s: Served, item: int, meta: dict[str, Any]) -> str | None:
        """``item_image``'s URL (index names need no quoting), under the proxy's prefix and host."""
        return f"{request.base_url}items/{s.name}/{item}/image" if s.has_image(item, meta) else None

    async def search_ids(s: Served, query: Query, modality: str, k: int, dedup: bool) -> tuple[np.ndarray, np.ndarray]:
        query.modality, query.k = modality, k
        answer = await batcher(query)
        ids, scores = answer.ids, answer.scores
        if dedup and len(ids):  # type: ignore[arg-type]
            vectors = s.index.embeddings("image")
            small = len(ids) <= INLINE_ROWS  # type: ignore[arg-type]
            keep = unique(vectors[ids]) if small else await run_in_threadpool(lambda: unique(vectors[ids]))
            ids, scores = ids[keep], scores[keep]  # type: ignore[index]
        return ids, scores  # type: ignore[return-value]

    def clip_fields(request: Request, s: Served, item: int, row: dict[str, Any]) -> dict[str, Any]:
        """An item's metadata as clip-retrieval's front end reads it: every column, ``caption`` (the first
        caption when the caption column has another name) and ``url`` (the image on this server)."""
        out = {k: v for k, v in row.items() if k not in ("id", "captions")}
        if "caption" not in out and row.get("captions"):
            out["caption"] = row["captions"][0]
        if "url" not in out and (url := image_url(request, s, item, row)) is not None:
            out["url"] = url
        return out

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        csp = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'"
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": csp})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness: answers while the server runs (no API key needed)."""
        return {"status": "ok", "indexes": len(served)}

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text: requests and latency per route, time per stage, batch sizes, queue depth."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/indices", tags=["search"])
    async def indices() -> list[dict[str, Any]]:
        """The served indexes: name, counts, embedding size, model, searchable sides."""
        return [{"name": s.name, "items": len(s.index), "texts": int(s.index.manifest["counts"]["texts"]),
                 "dim": s.index.dim, "model": s.index.manifest["model"]["spec"],
                 "weights_hash": s.index.manifest["model"]["weights_hash"],
                 "modalities": sorted(s.index.manifest["indexes"]), "images": bool(s.roots)}
                for s in served.values()]  # fmt: skip

    @app.post("/search", tags=["search"], dependencies=posts, response_model=SearchResponse)
    async def search(body: SearchRequest, request: Request) -> JSONResponse:
        """The ``k`` items nearest a text, an image, an embedding or a stored item, best first (cosine)."""
        s = pick(body.index)
        check_k(body.k, body.offset)
        check_modality(s, body.modality)
        image = b64decode(body.image) if body.image is not None else None
        query = await make_query(s, body.text, image, body.embedding, body.item)
        ids, scores = await search_ids(s, query, body.modality, body.k + body.offset, body.deduplicate)
        ids, scores = ids[body.offset :], scores[body.offset :]
        rows = await metadata(s, ids)
        hits = [{"id": int(i), "score": float(score), "metadata": {k: v for k, v in row.items() if k != "id"},
                 "image": image_url(request, s, int(i), row)} for i, score, row in zip(ids, scores, rows)]  # fmt: skip
        return JSONResponse({"index": s.name, "modality": body.modality, "hits": hits})

    @app.post("/embed", tags=["search"], dependencies=posts, response_model=EmbedResponse)
    async def embed(body: EmbedRequest) -> JSONResponse:
        """The L2-normalised embedding of a text or an image, by the model of ``index``."""
        s = pick(body.index)
        image = b64decode(body.image) if body.image is not None else None
        answer = await batcher(await make_query(s, body.text, image))
        return JSONResponse({"index": s.name, "dim": s.index.dim, "embedding": answer.vector.tolist()})

    @app.get("/items/{index}/{id}", tags=["search"])
    async def item(index: str, id: Annotated[int, PathParam(ge=0, lt=MAX_ID)], request: Request) -> dict[str, Any]:
        """An item's metadata (every column, all its captions) and its image URL."""
        s = pick(index)
        check_item(s, id)
        row = (await metadata(s, np.array([id])))[0]
        return {**row, "image": image_url(request, s, id, row)}

    @app.get("/items/{index}/{id}/image", tags=["search"], name="item_image", response_class=FileResponse)
    async def item_image(index: str, id: Annotated[int, PathParam(ge=0, lt=MAX_ID)]) -> FileResponse:
        """The item's image file, served only from inside the folder its index was built from."""
        s = pick(index)
        check_item(s, id)
        row = (await metadata(s, np.array([id])))[0]
        path = await run_in_threadpool(s.image_file, id, row)
        if path is None:
            raise HTTPException(404, f"no image file for item {id} of {s.name!r} on this server")
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})

    @app.post("/explain", tags=["search"], dependencies=posts, response_class=Response,
              responses={200: {"content": {"image/png": {}}}})  # fmt: skip
    async def explain(body: ExplainRequest) -> Response:
        """PNG: the image with a heatmap of where ``text`` matches it (``mmlm.explain.heatmap_png``)."""
        from mmlm.explain import METHODS, heatmap_png

        s = pick(body.index)
        if body.method is not None and body.method not in METHODS:
            raise HTTPException(422, f"method {body.method[:50]!r}: use one of {', '.join(METHODS)}")
        if not body.text.strip() or len(body.text) > limits.max_text:
            raise HTTPException(422, f"text: give 1 to {limits.max_text:,} characters")
        if (body.image is None) == (body.item is None):
            raise HTTPException(422, "give exactly one of image, item")
        if body.image is not None:
            picture = await run_in_threadpool(read_image, b64decode(body.image), limits)
        else:
            check_item(s, body.item)  # type: ignore[arg-type]
            row = (await metadata(s, np.array([body.item])))[0]
            path = await run_in_threadpool(s.image_file, body.item, row)
            if path is None:
                raise HTTPException(404, f"no image file for item {body.item} of {s.name!r} on this server")
            loaded = await run_in_threadpool(load_image, str(path))
            if isinstance(loaded, Skip):
                raise HTTPException(404, f"item {body.item}: {loaded.reason.replace('_', ' ')}")
            picture = loaded
        picture.thumbnail((EXPLAIN_SIDE, EXPLAIN_SIDE))
        method = {"method": body.method} if body.method else {}
        # on the model thread: some methods hook into the model, which must not meet a search batch
        png = await batcher.run(partial(heatmap_png, s.engine.model, s.engine.tokenizer, picture, body.text, **method))
        return Response(png, media_type="image/png")

    @app.post("/knn-service", tags=["clip-retrieval"], dependencies=posts)
    async def knn_service(body: KnnRequest, request: Request) -> list[dict[str, Any]]:
        """clip-retrieval's query: ``num_result_ids`` results as ``{"id", "similarity", <metadata>}``, the
        metadata (``caption``, ``url`` and every column) on the first ``num_images``."""
        s = pick(body.indice_name)
        total = body.num_result_ids or body.num_images
        check_k(total, what="num_result_ids")
        check_modality(s, body.modality)
        if body.image:
            image = b64decode(body.image)
        elif body.image_url:
            image = await run_in_threadpool(fetch_image, body.image_url, image_url_allow, limits.max_body)
        else:
            image = None
        query = await make_query(s, body.text or None, image, body.embedding_input)
        ids, scores = await search_ids(s, query, body.modality, total, body.deduplicate)
        rows = await metadata(s, ids[: body.num_images])
        out = [clip_fields(request, s, int(i), row) for i, row in zip(ids, rows)]
        out += [{} for _ in range(len(ids) - len(out))]
        for entry, i, score in zip(out, ids, scores):
            entry["id"], entry["similarity"] = int(i), float(score)
        return JSONResponse(out)  # type: ignore[return-value]

    @app.get("/indices-list", tags=["clip-retrieval"])
    async def indices_list() -> list[str]:
        """clip-retrieval's list of index names."""
        return list(served)

    @app.post("/metadata", tags=["clip-retrieval"], dependencies=posts)
    async def clip_metadata(body: MetadataRequest, request: Request) -> list[dict[str, Any]]:
        """clip-retrieval's metadata of ``ids``: ``[{"id", "metadata": {...}}]`` (empty for unknown ids)."""
        s = pick(body.indice_name)
        check_k(len(body.ids) or 1, what="len(ids)")
        rows = await metadata(s, np.asarray(body.ids, dtype=np.int64))
        return JSONResponse([{"id": i, "metadata": clip_fields(request, s, i, row) if row else {}}  # type: ignore[return-value]
                             for i, row in zip(body.ids, rows)])  # fmt: skip

    return app
