"""The model worker: one supervised thread that micro-batches queries through the models and FAISS.

::

    route ──Query──► queue (bounded: full -> 429) ──► worker thread: drain up to max_batch, encode per Runtime,
      ▲                                                search per (index, side) ──► answers, one loop call a batch
      └──── await future, at most query_timeout_s (-> 504) ◄──────────────────────────────┘

No exception ends the worker silently: a batch that raises fails its own queries (500) and the worker goes on;
anything that still ends the thread (a ``BaseException``, a bug outside the batch guard) fails every query it
held or that waits in the queue with a 503, and from then on ``alive`` is False: ``/healthz`` answers 503 and
new queries fail at once with 503 instead of waiting for a thread that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import HTTPException

from mmlm.serve.metrics import Metrics
from mmlm.serve.runtime.base import Runtime
from mmlm.serve.served import Served
from mmlm.serve.threads import compute_settings

POLL = 0.25  # seconds an idle worker waits on the queue before it looks at the stop flag again
STOP_WAIT = 5.0  # seconds a shutdown waits for the batch in hand; a stuck one is left to the (daemon) thread

log = logging.getLogger("mmlm.serve")


@dataclass(eq=False)
class Query:
    """One query for the model thread: an input (text, pixels or a vector) and what to search, if anything."""

    served: Served
    text: str | None = None
    pixels: np.ndarray | None = None  # (3, H, W) float32, as the served index's runtime preprocessed it
    vector: np.ndarray | None = None
    modality: str | None = None  # the side to search; None: only the embedding is wanted
    k: int = 0
    ids: np.ndarray | None = None  # search only these items (``Index.select``); None: all
    where: str | None = None  # what selected ``ids`` (canonical JSON): queries with the same one share a search
    min_score: float | None = None  # hits below it are dropped
    future: asyncio.Future | None = None
    queued: float = 0.0


@dataclass
class Answer:
    vector: np.ndarray
    ids: np.ndarray | None = None
    scores: np.ndarray | None = None


class Batcher:
    """Queries that arrive together share forward passes and FAISS searches.

    One thread runs the models (a second would only fight the first for the cores), fed by a
    thread-safe queue: whatever queued while it was busy becomes the next batch, up to ``max_batch``;
    after a batch of more than one (the server is busy) it waits ``max_wait`` seconds at most for
    more. Answers go back to the event loop in one call per batch.
    """

    def __init__(
        self, metrics: Metrics, max_batch: int = 64, max_wait: float = 0.002, max_queue: int = 1024, threads: int = 1,
        timeout: float = 30.0,
    ) -> None:  # fmt: skip
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("threads", threads)):
            if value < 1:
                raise ValueError(f"{name}={value}: give a number >= 1")
        self.metrics, self.max_batch, self.max_wait, self.max_queue = metrics, max_batch, max(0.0, max_wait), max_queue
        self.timeout = timeout
        self.queue: queue.Queue[Query] = queue.Queue(max_queue)
        self.thread = threading.Thread(target=self._work, args=(threads,), name="mmlm-model", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = threading.Event()
        self.died: str | None = None  # why the worker ended, if it ended without being stopped
        self.batch: list[Query] = []  # the batch in hand: failed with the rest if the thread ends under it

    # ------------------------------------------------------------------ the event loop's side

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping.is_set()

    def trouble(self) -> str | None:
        """None while the worker can answer, else why not (``/healthz`` says it with a 503)."""
        if self.died is not None:  # set before the thread ends: true from its last moments on
            return f"the model worker stopped ({self.died}); restart the server"
        if self.alive:
            return None
        return "the model worker is not running (the server is starting or shutting down)"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread.start()

    async def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            await asyncio.to_thread(self.thread.join, STOP_WAIT)

    async def __call__(self, query: Query) -> Answer:
        """The query's answer, or an HTTPException: 503 without a worker, 429 when the queue is full, 504 past
        the deadline."""
        if (why := self.trouble()) is not None:
            raise HTTPException(503, why)
        query.future, query.queued = asyncio.get_running_loop().create_future(), time.perf_counter()
        try:
            self.queue.put_nowait(query)
        except queue.Full:
            raise HTTPException(429, f"busy: {self.max_queue} queries waiting; retry shortly",
                                headers={"Retry-After": "1"}) from None  # fmt: skip
        if not self.thread.is_alive():  # it ended after the check above: nobody will take what is queued
            self._fail_queued(self.trouble() or "the model worker stopped")
        try:
            return await asyncio.wait_for(query.future, self.timeout)
        except asyncio.TimeoutError:  # the future is cancelled with it: the worker skips it
            raise HTTPException(504, f"no answer from the model within {self.timeout:g} s (query_timeout_s): "
                                     "the server is overloaded or its model is stuck") from None  # fmt: skip

    # ------------------------------------------------------------------ the worker thread's side

    def _work(self, threads: int) -> None:
        try:
            compute_settings(threads)
            self._serve()
        except BaseException as e:  # noqa: BLE001 -- the thread ends either way; say why, fail what it held
            self.died = f"{type(e).__name__}: {e}"
            log.critical("the model worker ended: %s", self.died, exc_info=e)
        finally:
            if self.died is None and not self.stopping.is_set():
                self.died = "it returned"
            why = self.trouble() or "the server is shutting down"
            self._fail(self.batch, 503, why)
            self._fail_queued(why)

    def _serve(self) -> None:
        busy = False
        while not self.stopping.is_set():
            try:
                self.batch = [self.queue.get(timeout=POLL)]
            except queue.Empty:
                continue
            try:
                busy = self._step(busy)
            except Exception as e:  # a failed batch fails its own queries, not the worker
                log.exception("a batch of %d queries failed", len(self.batch))
                self.metrics.failures.inc()
                self._fail(self.batch, 500, f"the model failed on this query's batch ({type(e).__name__}: {e})")
            self.batch = []

    def _step(self, busy: bool) -> bool:
        """One batch: what queued meanwhile (and, when busy, a little longer), answered; True if it held more
        than one query (the server is busy)."""
        self._drain()
        if busy and len(self.batch) < self.max_batch and self.max_wait > 0:
            time.sleep(self.max_wait)
            self._drain()
        self.metrics.queue.set(self.queue.qsize())
        batch = [q for q in self.batch if not q.future.done()]  # type: ignore[union-attr]  # clients gone, timed out
        if batch:
            self._reply([(q.future, answer, None) for q, answer in zip(batch, self._run(batch))])
        return len(batch) > 1

    def _drain(self) -> None:
        while len(self.batch) < self.max_batch:
            try:
                self.batch.append(self.queue.get_nowait())
            except queue.Empty:
                return

    def _fail_queued(self, why: str) -> None:
        """Fails every query still queued with a 503 (from either thread: the queue is thread-safe)."""
        taken = []
        try:
            while True:
                taken.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        except Exception:  # a broken queue: what it still holds gets its 504 at the deadline
            log.exception("could not empty the queue of a stopped model worker")
        self._fail(taken, 503, why)

    def _fail(self, queries: list[Query], status: int, detail: str) -> None:
        """Fails ``queries`` with an HTTPException each (one instance per request: each gets its own traceback)."""
        self._reply([(q.future, None, HTTPException(status, detail)) for q in queries if q.future is not None])

    def _reply(self, outcomes: list[tuple[Any, Any, BaseException | None]]) -> None:
        if not outcomes or self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(_resolve, outcomes)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _run(self, batch: list[Query]) -> list[Answer]:
        start = time.perf_counter()
        for q in batch:
            self.metrics.stage("queue", start - q.queued)
        self.metrics.batch.observe(len(batch))
        vectors: list[np.ndarray | None] = [q.vector for q in batch]
        texts: dict[Runtime, list[int]] = defaultdict(list)
        images: dict[Runtime, list[int]] = defaultdict(list)
        for i, q in enumerate(batch):
            if q.text is not None:
                texts[q.served.runtime].append(i)
            elif q.pixels is not None:
                images[q.served.runtime].append(i)
        for runtime, rows in texts.items():
            self._encode(vectors, rows, runtime.encode_text, [batch[i].text for i in rows])
        for runtime, rows in images.items():
            self._encode(vectors, rows, lambda pixels, r=runtime: r.encode_image(np.stack(pixels)),
                         [batch[i].pixels for i in rows])  # fmt: skip
        answers = [Answer(v) for v in vectors]  # type: ignore[arg-type]
        # one FAISS search per Served (not per name: after a reload, ``reload``, queries of one name may hold two
        # versions, each answered from the one its request reads metadata from), side and filter: a selection
        # applies to every query of a search
        searches: dict[tuple[int, str, str | None], list[int]] = defaultdict(list)
        for i, q in enumerate(batch):
            if q.modality is not None:
                searches[(id(q.served), q.modality, q.where)].append(i)
        for (_, modality, _), rows in searches.items():
            t = time.perf_counter()
            k = max(batch[i].k for i in rows)
            first = batch[rows[0]]
            ids, scores = first.served.index.search(np.stack([vectors[i] for i in rows]), k, modality, ids=first.ids)
            for row, i in enumerate(rows):
                q_ids, q_scores = ids[row, : batch[i].k], scores[row, : batch[i].k]
                found = q_ids >= 0  # FAISS pads with -1 where fewer exist
                if batch[i].min_score is not None:
                    found &= q_scores >= batch[i].min_score
                answers[i].ids, answers[i].scores = q_ids[found], q_scores[found]
            self.metrics.stage("search", time.perf_counter() - t)
        return answers

    def _encode(self, vectors: list[np.ndarray | None], rows: list[int], encode: Callable, inputs: list[Any]) -> None:
        start = time.perf_counter()
        for i, vector in zip(rows, encode(inputs)):
            vectors[i] = vector
        self.metrics.stage("encode", time.perf_counter() - start)


def _resolve(outcomes: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    """On the event loop: the answers of a batch (a client gone or timed out has its future cancelled)."""
    for future, result, error in outcomes:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)
