"""Who may call and what a request may carry, checked before any route runs: the API key, the body size, the
content type of clip-retrieval's posts; and the API key kept out of the access log."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Sequence
from urllib.parse import parse_qs

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = ("/healthz", "/", "/static/")  # no API key: the page and its script hold no data


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
        # compared in constant time: the time to refuse a wrong key tells nothing about the right one
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
