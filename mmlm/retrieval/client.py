"""``Client``: the retrieval API of ``mmlm serve`` from Python, on the standard library alone (no torch,
no HTTP package), so that any program can query a server::

    from mmlm.retrieval import Client

    client = Client("http://127.0.0.1:8000", api_key=None)
    for hit in client.search("a rocket on the launch pad", k=5):
        print(hit["score"], hit["metadata"].get("caption"))

``load``: many concurrent clients at once, for load tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple

# rclip's query syntax (github.com/yurijmikhalevich/rclip): terms joined by a lone + or -, each with an optional
# "W:" weight (a number without a sign, as rclip's multiplier); a lone sign, so "t-shirt" stays one term
SIGN = re.compile(r"(?<!\S)([+-])(?!\S)")
WEIGHT = re.compile(r"(\d+(?:\.\d*)?|\.\d+):(.+)", re.DOTALL)
ITEM = re.compile(r"#(\d+)")  # a stored item's id as a query term


class ApiError(ValueError):
    """The server refused a request (``status``: its HTTP status, ``detail``: its message)."""

    def __init__(self, status: int, detail: Any, url: str) -> None:
        super().__init__(f"{url}: HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def encode_image(image: str | os.PathLike | bytes | Any) -> str:
    """base64 of an image file: a path, its bytes, or a PIL image (sent as PNG)."""
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        buf = BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    return base64.b64encode(data).decode("ascii")


def parse_query(query: str, is_file: Callable[[str], bool] = os.path.isfile) -> list[dict[str, Any]]:
    """The terms of a query in rclip's syntax, as ``/search`` takes them: ``"2:golden retriever" + ./pool.jpg -
    fruit`` -> ``[{"text": "golden retriever", "weight": 2.0}, {"image": "./pool.jpg", "weight": 1.0},
    {"text": "fruit", "weight": -1.0}]``. ``#12`` is the stored item 12 (``{"item": 12}``, "more like this"); a
    term that names an existing file (``is_file``) is an image; any other is text. Quotes around a term are
    dropped; a leading sign applies to the first term. mmlm serve's page reads the same syntax (its app.js)."""
    parts = SIGN.split(query.strip())
    if parts[0] == "" and len(parts) > 1:  # "- fruit": the first term has a sign
        parts = parts[1:]
    else:
        parts = ["+", *parts]
    terms = []
    for sign, text in zip(parts[::2], parts[1::2]):
        text, weight = _unquote(text), 1.0
        if (found := WEIGHT.fullmatch(text)) is not None:  # "2:golden retriever" or 2:"golden retriever"
            weight, text = float(found.group(1)), _unquote(found.group(2))
        if not text:
            raise ValueError(f"query {query!r}: an empty term (a + or - with nothing after it?)")
        weight = -weight if sign == "-" else weight
        if (item := ITEM.fullmatch(text)) is not None:  # "#12": stored item 12, "more like this"
            terms.append({"item": int(item.group(1)), "weight": weight})
        elif is_file(os.path.expanduser(text)):
            terms.append({"image": os.path.expanduser(text), "weight": weight})
        else:
            terms.append({"text": text, "weight": weight})
    return terms


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" else text


class Client:
    """A running ``mmlm serve`` at ``url``.

    Args:
        url: the server's address (with its path prefix behind a reverse proxy).
        api_key: sent as ``X-API-Key``; default: the ``MMLM_API_KEY`` environment variable.
        index: the index to query when a call names none; default: the server's first.
        timeout: seconds to wait for an answer.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, index: str | None = None,
                 timeout: float = 60.0) -> None:  # fmt: skip
        self.url = url.rstrip("/") + "/"
        self.api_key = api_key if api_key is not None else os.environ.get("MMLM_API_KEY")
        self.index, self.timeout = index, timeout

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def search(
        self, text: str | None = None, *, image: Any = None, embedding: Any = None, item: int | None = None,
        terms: list[dict[str, Any]] | None = None, where: dict[str, Any] | None = None,
        min_score: float | None = None, modality: str = "image", k: int = 10, offset: int = 0,
        index: str | None = None, deduplicate: bool = False,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """The ``k`` nearest items of one query (a text, an image path / bytes / PIL image, a vector, a stored
        ``item``, or weighted ``terms`` of them: ``[{"text": "dog", "weight": 2}, {"image": "pool.jpg"}]``) on
        the ``modality`` side, best first: ``[{"id", "score", "metadata", "image"}]``. ``where``: only items
        whose metadata match (``{"year": {"gte": 2020}}``, see ``Index.select``); ``min_score``: none below it."""
        body: dict[str, Any] = {"modality": modality, "k": k, "offset": offset, "index": index or self.index,
                                "deduplicate": deduplicate, "where": where, "min_score": min_score}  # fmt: skip
        if terms is not None:
            if any(v is not None for v in (text, image, embedding, item)):
                raise ValueError("give terms or one of text, image, embedding, item, not both")
            body["terms"] = [{**self._query(**{k: v for k, v in t.items() if k != "weight"}),
                              "weight": float(t.get("weight", 1.0))} for t in terms]  # fmt: skip
        else:
            body.update(self._query(text, image, embedding, item))
        return self._call("POST", "search", body)["hits"]

    def embed(self, text: str | None = None, *, image: Any = None, index: str | None = None) -> list[float]:
        """The L2-normalised embedding of a text or an image, by the model of ``index``."""
        body = {"index": index or self.index, **self._query(text, image, None, None)}
        return self._call("POST", "embed", body)["embedding"]

    def indices(self) -> list[dict[str, Any]]:
        """The served indexes: name, items, texts, dim, model, modalities."""
        return self._call("GET", "indices")

    def item(self, id: int, index: str | None = None) -> dict[str, Any]:
        """An item's metadata (and the URL of its image, if the server has it)."""
        return self._call("GET", f"items/{self._index(index)}/{int(id)}")

    def image(self, id: int, index: str | None = None) -> bytes:
        """An item's image file."""
        return self._call("GET", f"items/{self._index(index)}/{int(id)}/image", raw=True)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "healthz")

    def _index(self, index: str | None) -> str:
        name = index or self.index or self.indices()[0]["name"]
        return urllib.parse.quote(name, safe="")

    @staticmethod
    def _query(text: str | None = None, image: Any = None, embedding: Any = None, item: int | None = None
               ) -> dict[str, Any]:  # fmt: skip
        given = {"text": text, "image": image, "embedding": embedding, "item": item}
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, embedding, item (got {', '.join(given) or 'none'})")
        if "image" in given:
            given["image"] = encode_image(given["image"])
        if "embedding" in given:
            given["embedding"] = [float(x) for x in getattr(embedding, "tolist", lambda: embedding)()]
        return given

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, raw: bool = False) -> Any:
        url = self.url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(text).get("detail", text)
            except (ValueError, AttributeError):
                detail = text
            raise ApiError(e.code, detail, url) from None
        return payload if raw else json.loads(payload)


class Load(NamedTuple):
    """What ``load`` measured: seconds per answered request (in answer order), failures, the answers
    (parsed JSON, in request order; None where a request failed) and the wall time of the whole run."""

    latencies: list[float]
    errors: list[tuple]
    answers: list[Any]
    wall: float


def load(url: str, bodies: list[dict[str, Any]], clients: int, time_limit: float | None = None,
         path: str = "search", api_key: str | None = None) -> Load:  # fmt: skip
    """POST each of ``bodies`` once to ``url/path`` from ``clients`` concurrent clients, each on one kept-alive
    connection and sending its next request when the previous one is answered.

    Plain HTTP/1.1 on asyncio streams rather than an HTTP package: a client that costs far less than the
    server keeps the measurement about the server. An error answer is recorded as ``(i, status, body[:200])``,
    a broken connection as ``("connection", repr(error))``; ``time_limit`` (seconds) raises TimeoutError.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path.rstrip("/") + "/" + path.lstrip("/")).encode()
    key = api_key if api_key is not None else os.environ.get("MMLM_API_KEY")
    head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" % (target, parts.netloc.encode())
    if key:
        head += b"X-API-Key: %s\r\n" % key.encode()
    payloads = [json.dumps(b).encode() for b in bodies]
    latencies: list[float] = []
    errors: list[tuple] = []
    answers: list[Any] = [None] * len(bodies)
    todo = iter(range(len(bodies)))  # one iterator shared by the clients: each request is sent once

    async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> tuple[int, bytes]:
        writer.write(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in todo:
                start = time.perf_counter()
                status, data = await post(reader, writer, payloads[i])
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors.append((i, status, data[:200]))
                else:
                    answers[i] = json.loads(data)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            errors.append(("connection", repr(e)))
        finally:
            writer.close()

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), time_limit)
        return time.perf_counter() - start

    wall = asyncio.run(run())
    return Load(latencies, errors, answers, wall)
