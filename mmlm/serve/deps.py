"""FastAPI dependencies of the routes: what the app holds (settings, served indexes, the model worker, the
explainer, metrics) and the checks every route shares. The app keeps its parts in ``app.state``; a route
names what it needs by type (``batcher: BatcherDep``), so a test can build an app with any parts."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from mmlm.serve.batcher import Batcher
from mmlm.serve.explainer import Explainer
from mmlm.serve.metrics import Metrics
from mmlm.serve.served import Served
from mmlm.serve.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_served(request: Request) -> dict[str, Served]:
    return request.app.state.served


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def get_explainer(request: Request) -> Explainer:
    return request.app.state.explainer


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServedDep = Annotated[dict[str, Served], Depends(get_served)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
ExplainerDep = Annotated[Explainer, Depends(get_explainer)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def json_body(request: Request) -> None:
    """A JSON body: ``application/json`` (or ``+json``), or no type at all, as clip-retrieval's client sends it."""
    kind = request.headers.get("content-type")
    if kind is None:
        return
    media = kind.split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise HTTPException(415, f"send the body as JSON (Content-Type: application/json), not {kind[:100]!r}")


JSON_BODY = [Depends(json_body)]  # the dependencies of every POST route


def pick(served: dict[str, Served], name: str | None) -> Served:
    """The index ``name``; None: the first served."""
    if name is None:
        return next(iter(served.values()))
    if name not in served:
        raise HTTPException(404, f"no index {name[:100]!r}; this server has {', '.join(served)}")
    return served[name]


def check_k(settings: Settings, k: int, offset: int = 0, what: str = "k") -> None:
    if k < 1 or k + offset > settings.max_k:
        raise HTTPException(422, f"{what}={k}, offset={offset}: need {what} >= 1 and {what} + offset "
                                 f"<= {settings.max_k}")  # fmt: skip


def check_modality(s: Served, modality: str) -> None:
    if modality not in s.index.manifest["indexes"]:
        raise HTTPException(400, f"index {s.name!r} has no {modality} embeddings to search")


def check_item(s: Served, item: int) -> None:
    if not 0 <= item < len(s.index):
        raise HTTPException(404, f"index {s.name!r} has no item {item} (ids 0 to {len(s.index) - 1})")


def check_text(settings: Settings, text: str) -> None:
    if not text.strip():
        raise HTTPException(422, "text: empty")
    if len(text) > settings.max_text:
        raise HTTPException(422, f"text of {len(text):,} characters; the limit is {settings.max_text:,}")
