"""Retrieval over image-text collections: ``mmlm index build|add|info`` and the ``Index`` they write.

- ``mmlm.retrieval.collection``: any DATA as keyed items (images, captions, metadata).
- ``mmlm.retrieval.build``: embedding on one process or many, chunks that survive a kill, the atomic write.
- ``mmlm.retrieval.index``: the folder's layout and ``Index`` (build / open / search / metadata / add).
- ``mmlm.retrieval.commands``: the command-line entry points of ``mmlm index``.
- ``mmlm.retrieval.client``: the Python client of the HTTP API (``mmlm.serve``) and ``mmlm search``.

Names are imported on first use, so the command line's ``--help`` does not load torch or FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmlm._lazy import lazy_exports

_EXPORTS = {"Index": "mmlm.retrieval.index", "Client": "mmlm.retrieval.client"}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mmlm.retrieval.client import Client
    from mmlm.retrieval.index import Index


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
