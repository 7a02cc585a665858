"""Prometheus series of one app (``/metrics``) and the middleware that counts every request into them."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# a label value per method a client may send would be a series per made-up method: the rest count as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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
        self.worker_up = Gauge("mmlm_worker_up", "1 while the model worker can answer queries (what /healthz says)",
                               registry=self.registry)  # fmt: skip
        self.failures = Counter("mmlm_worker_failures", "Batches the model worker failed (their queries got a 5xx)",
                                registry=self.registry)  # fmt: skip

    def stage(self, name: str, seconds: float) -> None:
        self.stages.labels(name).observe(seconds)


class MetricsMiddleware:
    """Counts every request and its latency under its route's template (``/items/{index}/{id}``) and a known
    method, so the series stay few whatever paths and methods clients make up."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]) -> None:
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
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
