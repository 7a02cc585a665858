"""Everything ``mmlm serve`` can be told, in one object: the command's options fill it, the app and its parts
read it (``request.app.state.settings`` through ``deps.SettingsDep``), so no option is threaded through
function after function."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_threads() -> int:
    """One core fewer than the machine has, at least one: the HTTP side keeps a core, and OpenMP threads
    beyond the free cores spin-wait and starve it (a 2-core text query: ~130 ms with 2 threads, ~3 ms with 1)."""
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True)
class Settings:
    """How one server runs. A request over a limit is refused with a 4xx and a message."""

    # the model (its weights hash is checked against each index's: ``mmlm.serve.runtime.load``)
    runtime: str = "torch"  # what runs it: ``torch`` (the model itself) or ``onnx`` (an exported folder, no torch)
    model: str | None = None  # torch: the indexes' model where it is now, if not at the spec they name
    onnx: Path | None = None  # onnx: the exported folder; None: each index's sibling (photos.index -> photos.onnx)
    device: str = "cpu"
    int8: bool = False  # encode queries with an int8 copy of the model (onnx: the folder must hold the int8 export)
    # who may call
    api_key: str | None = None  # every route but /healthz and the page needs it, when set
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API from a browser (``*``: any)
    image_url_allow: tuple[str, ...] = ()  # address prefixes ``image_url`` may name; none: refused
    # what else it serves
    clip_front: Path | None = None  # clip-retrieval's built front end (its wheel's front/build), at /clip-front/
    # what one request may ask
    max_body: int = 10 * 2**20  # bytes of a request body (base64 makes an image file 4/3 larger)
    max_pixels: int = 25_000_000  # width x height of an uploaded image, read from its header before decoding
    max_text: int = 1000  # characters of a text query (a CLIP reads its first 77 tokens anyway)
    max_k: int = 10_000  # results of one query: k + offset, clip-retrieval's num_result_ids
    # the model worker
    max_batch: int = 64  # queries per forward pass at most
    max_wait_ms: float = 2.0  # when busy, how long a batch waits for more queries at most
    max_queue: int = 1024  # queries waiting at most; more are refused with 429
    threads: int | None = None  # model (torch, ONNX Runtime) and FAISS threads; None: ``default_threads()``
    query_timeout_s: float = 30.0  # a query unanswered this long gets a 504, never a hang
    explain_timeout_s: float = 120.0  # the same for /explain (an occlusion map takes seconds on a CPU)
    # new versions
    reload_s: float = 1.0  # how often each index's CURRENT is read, to serve a new version (``reload``); 0: never

    def __post_init__(self) -> None:
        for name in ("max_body", "max_pixels", "max_text", "max_k", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: give a number >= 1")
        if self.runtime not in ("torch", "onnx"):
            raise ValueError(f"runtime={self.runtime!r}: use torch or onnx")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads}: give a number >= 1")
        if not self.reload_s >= 0:
            raise ValueError(f"reload_s={self.reload_s}: give a number of seconds, or 0 to never reload")
        for name in ("query_timeout_s", "explain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: give a number of seconds above 0")

    @property
    def worker_threads(self) -> int:
        return self.threads or default_threads()
