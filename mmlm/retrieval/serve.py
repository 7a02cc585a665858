"""``mmlm search``: the typed signature (jsonargparse reads it) of the command that queries a running ``mmlm serve``.

Only the standard library is imported here, so ``mmlm --help`` stays fast; the client is in
``mmlm.retrieval.client``. ``mmlm serve`` itself is ``mmlm.serve.command``: the server sits above the retrieval
package and imports it, never the other way round.
"""

from __future__ import annotations

import json
from typing import Any, Literal


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
