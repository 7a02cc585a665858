"""``mmlm serve``: the command's typed signature (jsonargparse reads it), which fills ``Settings``.

Only the standard library is imported at the top, so ``mmlm --help`` stays fast; the app is in
``mmlm.serve.app``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

API_KEY_ENV = "MMLM_API_KEY"


def serve(
    indexes: list[Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    runtime: Literal["torch", "onnx"] = "torch",
    onnx: Path | None = None,
    model: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    int8: bool = False,
    api_key: str | None = None,
    cors_origins: str = "",
    image_url_allow: str = "",
    clip_front: bool = False,
    max_body_mb: float = 10.0,
    max_pixels: int = 25_000_000,
    max_text: int = 1000,
    max_k: int = 10_000,
    max_batch: int = 64,
    max_wait_ms: float = 2.0,
    max_queue: int = 1024,
    query_timeout_s: float = 30.0,
    explain_timeout_s: float = 120.0,
    reload_s: float = 1.0,
    root_path: str = "",
    forwarded_allow_ips: str = "127.0.0.1",
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> None:
    """Serve indexes over HTTP: search API, clip-retrieval's routes, /metrics and a web page at /.

    Args:
        indexes: index folders (``mmlm index build --out``), each named by its folder (``photos.index``:
            ``photos``) or ``NAME=DIR``;
            requests that name no index get the first.
        host: address to listen on; ``0.0.0.0`` for every interface (put a reverse proxy in front).
        port: port to listen on (0: any free one, printed at start).
        runtime: what encodes the queries: ``torch`` (the model itself; ``/explain`` works) or ``onnx`` (the
            model exported by ``mmlm convert MODEL DST --to onnx``, through ONNX Runtime: no torch is imported,
            the server starts in a fraction of the time and memory; no ``/explain``).
        onnx: with ``--runtime onnx``, the exported folder; default: beside each index, named like it
            (``photos.index`` -> ``photos.onnx``). Refused unless its weights hash is the index's.
        model: with ``--runtime torch``, the indexes' model where it is now, if not at the spec they were
            built from; refused unless its weights hash is the indexes'.
        device: where the model runs: ``cpu``, ``cuda``, ``cuda:1``, ... (``--runtime onnx``: cpu only).
        threads: threads of the model (torch or ONNX Runtime) and FAISS per forward pass / search; default:
            one core fewer than the machine has (at least 1), leaving a core to the HTTP side.
        int8: encode queries with an int8 copy of the model (dynamic int8 Linear layers, CPU): text
            queries of a ViT-B/32 ~4x faster on a CPU with VNNI, embeddings within cosine 0.999 of
            float32 (scripts/bench.py --only query); the index and its embeddings stay as built. With
            ``--runtime onnx`` the folder must hold the int8 export (``mmlm convert ... --int8``).
        api_key: key every route but /healthz and the page needs (header ``X-API-Key`` or
            ``Authorization: Bearer``, or ``?api_key=``); default: the ``MMLM_API_KEY`` environment
            variable, which, unlike this option, other users cannot read in the process list.
        cors_origins: origins whose web pages may call the API, comma-separated (``*``: any); default: none.
        image_url_allow: URL prefixes clip-retrieval's ``image_url`` may fetch from, comma-separated;
            default: none, and ``image_url`` is refused (the server would fetch any address a client names),
            but for this server's own ``/items/{index}/{id}/image``, answered from the index.
        clip_front: also serve clip-retrieval's web front end (from its installed wheel) at ``/clip-front/``,
            pointed at this server: no ``--cors_origins`` needed. It sends no API key: not with ``--api_key``.
        max_body_mb: largest request body, in MiB (an image travels as base64: 4/3 of its file).
        max_pixels: largest uploaded image (width x height), checked before decoding.
        max_text: longest text query, in characters.
        max_k: most results of one query (k + offset, or ``num_result_ids``).
        max_batch: most queries in one forward pass.
        max_wait_ms: how long a batch waits for more queries at most, when the server is busy.
        max_queue: most queries waiting for the model; more are refused with 429.
        query_timeout_s: a query the model has not answered in this many seconds gets a 504.
        explain_timeout_s: the same for /explain, which runs on a thread of its own.
        reload_s: how often each index's current version is looked up, so that ``mmlm index add`` / ``sync``
            are served without a restart; 0: never.
        root_path: the path prefix a reverse proxy serves the API under (``/search-api``).
        forwarded_allow_ips: proxies whose X-Forwarded-* headers are trusted (comma-separated, ``*``: any).
        log_level: uvicorn's log level.
    """
    from mmlm.errors import UsageError, check_at_least, check_device, check_port

    check_port(port)  # before the indexes and the model load, not when uvicorn binds
    if runtime == "onnx":  # check_device would import torch
        for name, value, wanted in (("device", device, "cpu"), ("model", model, None)):
            if value != wanted:
                raise UsageError(f"--{name} {value}: not with --runtime onnx, which runs the exported folder "
                                 "(--onnx) on the CPU")  # fmt: skip
    else:
        if onnx is not None:
            raise UsageError(f"--onnx {onnx}: give --runtime onnx too (the default runtime is torch)")
        check_device(device)
    check_at_least(1, threads=threads, max_pixels=max_pixels, max_text=max_text, max_k=max_k, max_batch=max_batch,
                   max_queue=max_queue)  # fmt: skip
    check_at_least(0, max_wait_ms=max_wait_ms, reload_s=reload_s)
    for name, value, unit in (("max_body_mb", max_body_mb, "a size in MiB"), ("query_timeout_s", query_timeout_s,
                              "seconds"), ("explain_timeout_s", explain_timeout_s, "seconds")):  # fmt: skip
        if not value > 0:
            raise UsageError(f"--{name} {value}: give {unit} above 0")
    key = api_key or os.environ.get(API_KEY_ENV)
    if clip_front and key:
        raise UsageError("--clip_front: clip-retrieval's front end cannot send an API key; serve it without "
                         f"--api_key / {API_KEY_ENV}")  # fmt: skip
    front = clip_front_folder() if clip_front else None
    from mmlm.serve.served import open_indexes
    from mmlm.serve.settings import Settings

    settings = Settings(
        runtime=runtime, model=model, onnx=onnx, device=device, int8=int8, api_key=key,
        cors_origins=tuple(_split(cors_origins)), image_url_allow=tuple(_split(image_url_allow)), clip_front=front,
        max_body=int(max_body_mb * 2**20), max_pixels=max_pixels, max_text=max_text, max_k=max_k,
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, threads=threads,
        query_timeout_s=query_timeout_s, explain_timeout_s=explain_timeout_s, reload_s=reload_s,
    )  # fmt: skip
    folders = [str(i) for i in indexes]
    with ThreadPoolExecutor(1, thread_name_prefix="mmlm-open") as pool:
        if runtime == "onnx":
            # ONNX Runtime builds its sessions (a ViT-B/32's: about a second) without holding the GIL: on a
            # thread, they are built while FastAPI and uvicorn are imported here. Its modules are imported
            # first, here: two threads importing at once can meet each other's half-initialised modules.
            import mmlm.serve.runtime.onnx  # noqa: F401

            opening = pool.submit(open_indexes, folders, None, device, int8, runtime, onnx, settings.worker_threads)
        import logging

        import uvicorn

        from mmlm.serve.app import create_app
        from mmlm.serve.security import RedactApiKey

        if runtime == "onnx":
            served = opening.result()
        else:  # torch's own imports would only take turns with these for the GIL
            served = open_indexes(folders, model, device, int8, runtime, onnx, settings.worker_threads)
    app = create_app(settings, served)
    logging.getLogger("uvicorn.access").addFilter(RedactApiKey())
    uvicorn.run(app, host=host, port=port, root_path=root_path, proxy_headers=True,
                forwarded_allow_ips=forwarded_allow_ips, log_level=log_level)  # fmt: skip


def clip_front_folder() -> Path:
    """The built front end the clip-retrieval wheel installs (``front/build`` beside its package), or a
    ``UsageError`` saying how to get it."""
    from importlib.metadata import PackageNotFoundError, distribution

    from mmlm.errors import UsageError

    try:
        folder = Path(str(distribution("clip-retrieval").locate_file("front/build")))
    except PackageNotFoundError:
        raise UsageError("--clip_front: clip-retrieval is not installed "
                         "(`pip install clip-retrieval --no-deps` brings its front end)") from None  # fmt: skip
    if not (folder / "index.html").is_file() or not (folder / "config.json").is_file():
        raise UsageError(f"--clip_front: clip-retrieval is installed without its built front end ({folder})")
    return folder


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]
