"""``mmlm serve`` and ``mmlm search``: typed signatures for the command line (jsonargparse reads them).

Only the standard library is imported here, so ``mmlm --help`` stays fast; the server is in
``mmlm.retrieval.server``, the client in ``mmlm.retrieval.client``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

API_KEY_ENV = "MMLM_API_KEY"


def serve(
    indexes: list[Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    model: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    int8: bool = False,
    api_key: str | None = None,
    cors_origins: str = "",
    image_url_allow: str = "",
    max_body_mb: float = 10.0,
    max_pixels: int = 25_000_000,
    max_text: int = 1000,
    max_k: int = 10_000,
    max_batch: int = 64,
    max_wait_ms: float = 2.0,
    max_queue: int = 1024,
    root_path: str = "",
    forwarded_allow_ips: str = "127.0.0.1",
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> None:
    """Serve indexes over HTTP: search API, clip-retrieval's routes, /metrics and a web page at /.

    Args:
        indexes: index folders (``mmlm index build --out``), each named by its folder or ``NAME=DIR``;
            requests that name no index get the first.
        host: address to listen on; ``0.0.0.0`` for every interface (put a reverse proxy in front).
        port: port to listen on (0: any free one, printed at start).
        model: the indexes' model where it is now, if not at the spec they were built from; refused
            unless its weights hash is the indexes'.
        device: where the model runs: ``cpu``, ``cuda``, ``cuda:1``, ...
        threads: threads of torch and FAISS per forward pass / search; default: one core fewer than the
            machine has (at least 1), leaving a core to the HTTP side.
        int8: encode queries with an int8 copy of the model (dynamic int8 Linear layers, CPU): text
            queries of a ViT-B/32 ~4x faster on a CPU with VNNI, embeddings within cosine 0.999 of
            float32 (scripts/bench.py --only query); the index and its embeddings stay as built.
        api_key: key every route but /healthz and the page needs (header ``X-API-Key`` or
            ``Authorization: Bearer``, or ``?api_key=``); default: the ``MMLM_API_KEY`` environment
            variable, which, unlike this option, other users cannot read in the process list.
        cors_origins: origins whose web pages may call the API, comma-separated (``*``: any); default: none.
        image_url_allow: URL prefixes clip-retrieval's ``image_url`` may fetch from, comma-separated;
            default: none, and ``image_url`` is refused (the server would fetch any address a client names).
        max_body_mb: largest request body, in MiB (an image travels as base64: 4/3 of its file).
        max_pixels: largest uploaded image (width x height), checked before decoding.
        max_text: longest text query, in characters.
        max_k: most results of one query (k + offset, or ``num_result_ids``).
        max_batch: most queries in one forward pass.
        max_wait_ms: how long a batch waits for more queries at most, when the server is busy.
        max_queue: most queries waiting for the model; more are refused with 429.
        root_path: the path prefix a reverse proxy serves the API under (``/search-api``).
        forwarded_allow_ips: proxies whose X-Forwarded-* headers are trusted (comma-separated, ``*``: any).
        log_level: uvicorn's log level.
    """
    from mmlm.errors import UsageError, check_at_least, check_device, check_port

    check_port(port)  # before the indexes and the model load, not when uvicorn binds
    check_device(device)
    check_at_least(1, threads=threads, max_pixels=max_pixels, max_text=max_text, max_k=max_k, max_batch=max_batch,
                   max_queue=max_queue)  # fmt: skip
    check_at_least(0, max_wait_ms=max_wait_ms)
    if not max_body_mb > 0:
        raise UsageError(f"--max_body_mb {max_body_mb}: give a size in MiB above 0")
    import logging

    import uvicorn

    from mmlm.retrieval.server import Limits, RedactApiKey, create_app

    app = create_app(
        [str(i) for i in indexes], model, device=device, api_key=api_key or os.environ.get(API_KEY_ENV),
        cors_origins=_split(cors_origins), image_url_allow=_split(image_url_allow),
        limits=Limits(int(max_body_mb * 2**20), max_pixels, max_text, max_k),
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, threads=threads, int8=int8,
    )  # fmt: skip
    logging.getLogger("uvicorn.access").addFilter(RedactApiKey())
    uvicorn.run(app, host=host, port=port, root_path=root_path, proxy_headers=True,
                forwarded_allow_ips=forwarded_allow_ips, log_level=log_level)  # fmt: skip


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def search(
    url: str,
    query: str,
    image: bool = False,
    k: int = 10,
    modality: Literal["image", "text"] = "image",
    index: str | None = None,
    api_key: str | None = None,
    output: Literal["table", "json"] = "table",
) -> list[dict[str, Any]]:
    """Query a running `mmlm serve`: the k items nearest a text (or, with --image, an image file).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        query: the text to search for; with ``--image``, the path of an image file.
        image: ``query`` is an image file.
        k: results wanted.
        modality: the side to search: ``image`` (the pictures) or ``text`` (their captions).
        index: the index to search; default: the server's first.
        api_key: the server's API key; default: the ``MMLM_API_KEY`` environment variable.
        output: ``table`` (rank, score, id, caption or file) or ``json`` (the hits as the API returns them).
    """
    from mmlm.paths import resolve
    from mmlm.retrieval.client import Client

    client = Client(url, api_key=api_key, index=index)
    hits = client.search(image=resolve(query), modality=modality, k=k) if image else client.search(query, modality=modality, k=k)
    if output == "json":
        print(json.dumps(hits, indent=2))
        return hits
    for rank, hit in enumerate(hits, 1):
        meta = hit["metadata"]
        label = (meta.get("captions") or [meta.get("caption") or meta.get("filepath") or meta.get("url") or ""])[0]
        print(f"{rank:3d}  {hit['score']:7.4f}  {hit['id']:>8}  {label}")
    return hits
