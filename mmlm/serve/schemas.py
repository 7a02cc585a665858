"""The bodies the routes read and the answers they write (pydantic): what ``/openapi.json`` publishes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_ID = 2**63  # SQLite integers: a larger id is refused before it reaches the database


MAX_TERMS = 16  # terms of one combined query: each text or image is one more pass through the model


class Term(BaseModel):
    """One part of a combined query: exactly one of ``text``, ``image``, ``embedding``, ``item``, and its weight."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="an image file, base64 (a data: URL too)")
    embedding: list[float] | None = None
    item: int | None = Field(None, ge=0, lt=MAX_ID, description="this item's stored image embedding")
    # NaN is refused by the route, not here: pydantic's 422 would echo it, and JSON cannot carry NaN
    weight: float = Field(1.0, description="its share of the query; negative: away from it")


class SearchRequest(BaseModel):
    """Exactly one of ``text``, ``image``, ``embedding``, ``item``, ``terms``.

    ``terms``: the query is the L2-normalised weighted sum of the terms' L2-normalised embeddings, e.g.
    ``[{"text": "golden retriever", "weight": 2}, {"item": 17}, {"text": "fruit", "weight": -1}]``.
    ``where``: only items whose metadata match (``Index.select``): ``{"year": {"gte": 2020, "lt": 2024},
    "label": {"in": ["cat", "dog"]}, "filepath": {"prefix": "2024/"}, "source": "flickr"}``; the filter
    is applied inside the FAISS search, so ``k`` hits come back whenever ``k`` items match.
    """

    model_config = ConfigDict(extra="forbid")
    terms: list[Term] | None = Field(None, description=f"a combined query: 1 to {MAX_TERMS} weighted terms")
    where: dict[str, Any] | None = Field(None, description="conditions on the items' metadata columns (all hold)")
    min_score: float | None = Field(None, description="drop hits scoring below it (cosine)")
    text: str | None = Field(None, description="a text query")
    image: str | None = Field(None, description="an image file, base64 (a data: URL too)")
    embedding: list[float] | None = Field(None, description="a query vector of the index's dimension")
    item: int | None = Field(None, ge=0, lt=MAX_ID, description="search by this item's stored image embedding")
    modality: Literal["image", "text"] = Field("image", description="which side to search: images or captions")
    k: int = Field(10, ge=1, description="results wanted")
    offset: int = Field(0, ge=0, description="results to skip (paging)")
    index: str | None = Field(None, description="index name; default: the first served")
    deduplicate: bool = Field(False, description="drop results whose image is a near copy of a better one")


class EmbedRequest(BaseModel):
    """Exactly one of ``text``, ``image``."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="an image file, base64 (a data: URL too)")
    index: str | None = Field(None, description="whose model embeds it; default: the first index")


class ExplainRequest(BaseModel):
    """Where ``text`` matches an image: ``image`` (base64) or a stored ``item``."""

    model_config = ConfigDict(extra="forbid")
    text: str
    image: str | None = None
    item: int | None = Field(None, ge=0, lt=MAX_ID)
    index: str | None = None
    method: str | None = Field(None, description="one of mmlm.explain.METHODS; default: heatmap_png's")


class CaptionRequest(BaseModel):
    """What is in an image, in words: ``image`` (base64) or a stored ``item``, by a CoCa index's model."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = None
    item: int | None = Field(None, ge=0, lt=MAX_ID)
    index: str | None = None
    max_new_tokens: int = Field(20, ge=1, le=64, description="longest caption, in tokens")
    num_beams: int = Field(1, ge=1, le=8, description="beams of beam search; 1: greedy")


class CaptionResponse(BaseModel):
    caption: str
    index: str


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` body, as its ``ClipClient`` and front end send it."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = Field(None, description="base64 of an image file")
    image_url: str | None = Field(None, description="fetched only from addresses the server allows")
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, description="results with their metadata")
    num_result_ids: int | None = Field(None, ge=1, description="results in all (ids and similarities)")
    indice_name: str | None = None
    deduplicate: bool = False
    use_safety_model: bool = Field(False, description="accepted and ignored")
    use_violence_detector: bool = Field(False, description="accepted and ignored")
    use_mclip: bool = Field(False, description="accepted and ignored")
    aesthetic_score: int | float | str | None = Field(None, description="accepted and ignored")
    aesthetic_weight: int | float | str | None = Field(None, description="accepted and ignored")


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    indice_name: str | None = None
    ids: list[Annotated[int, Field(ge=0, lt=MAX_ID)]]


class Hit(BaseModel):
    id: int
    score: float
    metadata: dict[str, Any]
    image: str | None = Field(None, description="URL of the item's image file, when the server has it")


class SearchResponse(BaseModel):
    index: str
    modality: str
    hits: list[Hit]


class EmbedResponse(BaseModel):
    index: str
    dim: int
    embedding: list[float]
