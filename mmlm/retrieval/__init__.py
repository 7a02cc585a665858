"""Retrieval over image-text collections: ``mmlm index build|add|sync|info`` and the ``Index`` they write.

- ``mmlm.retrieval.collection``: any DATA as keyed items (images, captions, metadata).
- ``mmlm.retrieval.options``: ``Job``, ``Options`` and the defaults every entry point takes.
- ``mmlm.retrieval.work`` / ``embed`` / ``write`` / ``versions``: the work folder and its chunks, the
  embedding pass (Lightning predict), writing one version of an index, swapping it in atomically.
- ``mmlm.retrieval.build``: ``build_index`` / ``add_to_index`` (``mmlm index build|add``), over the above.
- ``mmlm.retrieval.sync``: ``sync_index`` (``mmlm index sync``): an index of image folders brought up to date.
- ``mmlm.retrieval.index``: the folder's layout and ``Index`` (open / search / metadata / close).
- ``mmlm.retrieval.commands``: the command-line entry points of ``mmlm index``.
- ``mmlm.retrieval.client``: the Python client of the HTTP API (``mmlm.serve``) and ``mmlm search``.

Names are imported on first use, so the command line's ``--help`` does not load torch or FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmlm._lazy import lazy_exports

_EXPORTS = {
    "Index": "mmlm.retrieval.index",
    "Client": "mmlm.retrieval.client",
    "build_index": "mmlm.retrieval.build",
    "add_to_index": "mmlm.retrieval.build",
    "sync_index": "mmlm.retrieval.sync",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mmlm.retrieval.build import add_to_index, build_index
    from mmlm.retrieval.client import Client
    from mmlm.retrieval.index import Index
    from mmlm.retrieval.sync import sync_index


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
