"""A running server serves the new version of its indexes without a restart and without failing a query.

``mmlm index add`` / ``sync`` / ``build --overwrite`` make a new version current by swapping ``DIR/CURRENT``
(``mmlm.retrieval.versions``). Every ``reload_s`` seconds ``Reloader`` reads each served index's CURRENT (a few
bytes); when it names another version, it opens that version on a pool thread and, on the event loop, puts a new
``Served`` in its name's place::

    request ─► pick(served, name) ─► its Served ─► the worker searches that Served's Index ─► metadata from the same
                      ▲
    Reloader: served[name] = Served(new Index)      old Index closed GRACE seconds later

The whole ``Served`` is swapped, not its ``index`` field: a request picks its ``Served`` once and reads its search
answer and then the answer's metadata from it, so both come from one version even when a swap falls between them
(a sync renumbers ids). The batcher groups searches by ``Served``, so a batch holding queries of both versions
answers each from its own. The old Index is closed once no request can hold it any more: a request waits for the
worker ``query_timeout_s`` at most, then reads metadata.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from mmlm.retrieval.index import Index, files_of
from mmlm.serve.served import Served, roots_of

GRACE_EXTRA = 10.0  # seconds past query_timeout_s before a replaced Index is closed (its metadata reads)

log = logging.getLogger("mmlm.serve")


class Reloader:
    """Swaps in the new version of each index of ``served`` (the app's dict, changed in place) as it appears."""

    def __init__(self, served: dict[str, Served], interval: float, grace: float) -> None:
        self.served, self.interval, self.grace = served, interval, grace
        self.retired: list[tuple[float, Index]] = []  # (when to close it, the Index a swap replaced)
        self.refused: dict[str, Path] = {}  # a version another model wrote: said once, not opened again
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Start checking, on the running loop (nothing when ``interval`` is 0)."""
        if self.interval > 0:
            self.task = asyncio.get_running_loop().create_task(self._run(), name="mmlm-reload")

    async def stop(self) -> None:
        """Stop checking and close every replaced Index (the served ones are the app's to close)."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        for _, index in self.retired:
            index.close()
        self.retired.clear()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 -- a failed check must not end reloading; the next one tries again
                log.exception("checking the indexes for a new version failed")

    async def check(self) -> list[str]:
        """One check: the names whose new version is now served."""
        opened = await asyncio.to_thread(self._open_new)
        for name, index in opened:  # on the event loop: a request sees one Served or the other, never a mix
            old = self.served[name]
            self.served[name] = replace(old, index=index, roots=roots_of(index), lock=threading.Lock())
            self.retired.append((time.monotonic() + self.grace, old.index))
            log.info("index %r: serving %s (%d items), was %s", name, index.files.name, len(index), old.version)
        now = time.monotonic()
        for _, index in [r for r in self.retired if r[0] <= now]:
            await asyncio.to_thread(index.close)
        self.retired = [r for r in self.retired if r[0] > now]
        return [name for name, _ in opened]

    def _open_new(self) -> list[tuple[str, Index]]:
        """On a pool thread: each index whose CURRENT names another version than the one served, opened."""
        opened = []
        for name, s in list(self.served.items()):
            try:
                files = files_of(s.index.folder)
                if files == s.index.files or self.refused.get(name) == files:
                    continue
                index = Index.open(s.index.folder)
            except (OSError, ValueError) as e:  # a folder moved away or broken: keep serving what is open
                log.warning("index %r: its new version cannot be opened (%s); still serving %s", name, e, s.version)
                continue
            if index.manifest["model"] != s.index.manifest["model"] or index.dim != s.index.dim:
                log.error("index %r: %s was built with another model (%s); still serving %s: restart the server to "
                          "serve it", name, index.files.name, index.manifest["model"]["spec"], s.version)  # fmt: skip
                self.refused[name] = index.files
                index.close()
                continue
            opened.append((name, index))
        return opened
