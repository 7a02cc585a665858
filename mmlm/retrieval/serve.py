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
    where: str | None = None,
    min_score: float | None = None,
    index: str | None = None,
    api_key: str | None = None,
    output: Literal["table", "json"] = "table",
) -> list[dict[str, Any]]:
    """Query a running `mmlm serve`: the k items nearest a text, an image file, or weighted terms of them.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        query: what to search for, in rclip's syntax: terms joined by `` + `` or `` - `` (spaces around the sign),
            each an image file if one exists at that path, else text, with an optional weight prefix ``W:``:
            ``"2:golden retriever + ./pool.jpg - fruit"``. With ``--image``, the path of one image file.
        image: ``query`` is one image file (whatever its name holds).
        k: results wanted.
        modality: the side to search: ``image`` (the pictures) or ``text`` (their captions).
        where: only items whose metadata match, as JSON: ``'{"year": {"gte": 2020}, "filepath": {"prefix":
            "2024/"}}'`` (a value: equal; gt, gte, lt, lte, in, prefix).
        min_score: leave out hits scoring (cosine) below this.
        index: the index to search; default: the server's first.
        api_key: the server's API key; default: the ``MMLM_API_KEY`` environment variable.
        output: ``table`` (rank, score, id, caption or file) or ``json`` (the hits as the API returns them).
    """
    from mmlm.paths import resolve
    from mmlm.retrieval.client import Client, parse_query

    try:
        filters = json.loads(where) if where is not None else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--where {where[:100]!r}: not JSON ({e})") from None
    client = Client(url, api_key=api_key, index=index)
    options: dict[str, Any] = {"modality": modality, "k": k, "where": filters, "min_score": min_score}
    if image:
        hits = client.search(image=resolve(query), **options)
    else:
        terms = parse_query(query)
        if len(terms) == 1 and terms[0]["weight"] == 1:  # one text or image: the plain query
            hits = client.search(**{kind: v for kind, v in terms[0].items() if kind != "weight"}, **options)
        else:
            hits = client.search(terms=terms, **options)
    if output == "json":
        print(json.dumps(hits, indent=2))
        return hits
    for rank, hit in enumerate(hits, 1):
        meta = hit["metadata"]
        label = (meta.get("captions") or [meta.get("caption") or meta.get("filepath") or meta.get("url") or ""])[0]
        print(f"{rank:3d}  {hit['score']:7.4f}  {hit['id']:>8}  {label}")
    return hits
