"""The API in this process: ``create_app`` over the session's index folders, driven by FastAPI's TestClient
(the lifespan runs: the model worker starts, warms up, and stops at the end)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from mmlm.serve.app import create_app
from mmlm.serve.served import open_indexes
from mmlm.serve.settings import Settings


class Api:
    """A TestClient with the process tests' helpers (``request``, ``get``, ``post``, ``json``)."""

    def __init__(self, client: TestClient, api_key: str | None = None) -> None:
        self.client, self.api_key, self.app = client, api_key, client.app

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, dict, bytes]:
        response = self.client.request(method, path, content=body,
                                       headers={k.replace("_", "-"): v for k, v in headers.items()})  # fmt: skip
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content

    def get(self, path: str, **headers: str) -> tuple[int, bytes]:
        status, _, data = self.request("GET", path, **headers)
        return status, data

    def post(self, path: str, body: dict | bytes, content_type: str | None = "application/json",
             **headers: str) -> tuple[int, dict]:  # fmt: skip
        """POST ``body`` (a dict as JSON) with ``content_type``; None sends no Content-Type, as ClipClient does."""
        if content_type is not None:
            headers = {"Content-Type": content_type, **headers}
        status, _, data = self.request("POST", path, json.dumps(body).encode() if isinstance(body, dict) else body,
                                       **headers)  # fmt: skip
        return status, json.loads(data)

    def json(self, path: str, body: dict | None = None, **headers: str):
        if body is None:
            status, data = self.get(path, **headers)
            answer = json.loads(data)
        else:
            status, answer = self.post(path, body, **headers)
        assert status == 200, (status, answer)
        return answer


@contextmanager
def serving(folders: dict[str, str], **settings) -> Iterator[Api]:
    """An app over ``folders`` ({name: index folder}) with ``Settings(threads=1, **settings)``, started (by the
    runtime ``settings`` name: ``runtime="onnx", onnx=FOLDER``)."""
    chosen = {"runtime": settings.get("runtime", "torch"), "onnx": settings.get("onnx"), "threads": 1}
    app = create_app(Settings(threads=1, **settings), open_indexes(folders, **chosen))
    with TestClient(app) as client:
        yield Api(client, settings.get("api_key"))
