"""``/explain`` apart from the searches: its own thread, so a slow occlusion map (seconds on a CPU) never holds
up a search batch, with a deadline and a short queue of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from fastapi import HTTPException

WAITING = 4  # explanations queued or running at most; more are refused with 429


class Explainer:
    """Runs explanations one at a time on a thread of its own (each may take the cores it finds free; two at
    once would only halve each other's speed)."""

    def __init__(self, timeout: float = 120.0, waiting: int = WAITING) -> None:
        self.timeout, self.waiting = timeout, waiting
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mmlm-explain")
        self.slots = threading.BoundedSemaphore(waiting)  # released when a job ends, not when its client gives up

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.slots.acquire(blocking=False):
            raise HTTPException(429, f"busy: {self.waiting} explanations waiting; retry shortly",
                                headers={"Retry-After": "5"})  # fmt: skip
        try:
            job = self.pool.submit(partial(fn, *args, **kwargs))
        except RuntimeError:  # shut down
            self.slots.release()
            raise HTTPException(503, "the server is shutting down") from None
        job.add_done_callback(lambda _: self.slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), self.timeout)
        except asyncio.TimeoutError:  # a job not yet started is cancelled; a running one finishes unseen
            raise HTTPException(504, f"no explanation within {self.timeout:g} s (explain_timeout_s)") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
