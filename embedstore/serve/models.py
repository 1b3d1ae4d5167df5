"""The typed requests and responses of the search server's JSON API (its OpenAPI page shows them).

A request names one kind of query (rows, paths, vectors or texts); unknown fields are refused,
so a typo is a 422 naming the field instead of a silently ignored option.

Crash safety: plain data; nothing here writes.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Where(BaseModel):
    """Filters every hit must pass (all that are given)."""

    model_config = ConfigDict(extra="forbid")
    label: str | None = Field(None, description="only images with this label ('' for unlabelled ones)")
    split: str | None = Field(None, description="only images of this split")
    path: str | None = Field(None, description="only images whose stored path starts with this prefix")

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class QueryRequest(BaseModel):
    """Exactly one of rows, paths, vectors or texts."""

    model_config = ConfigDict(extra="forbid")
    rows: list[int] | None = Field(None, description="store rows whose stored vectors are the queries")
    paths: list[str] | None = Field(None, description="stored image paths (relative to the collection root)")
    vectors: list[list[float]] | None = Field(None, description="raw vectors of the space's dimension")
    texts: list[str] | None = Field(None, description="texts, for spaces with a text tower (open_clip backbones)")
    space: str | None = Field(None, description="embedding space (default: the store's first frozen space)")

    def kinds(self) -> list[str]:
        return [k for k in ("rows", "paths", "vectors", "texts") if getattr(self, k) is not None]


class SearchRequest(QueryRequest):
    """A similarity search: the k nearest neighbours of each query, from ``offset`` on."""

    k: int = Field(10, ge=1, description="neighbours per query")
    offset: int = Field(0, ge=0, description="hits to skip (pages: offset=k, 2k, ...)")
    where: Where | None = None
    exclude_self: bool = Field(False, description="leave each query's own row out of its hits")
    exact: bool = Field(False, description="ignore the index and search exactly")


class PredictRequest(QueryRequest):
    """Labels of the queries by a head the server was started with (``--head NAME=DIR``)."""

    head: str = Field(..., description="the head's name, as /api/info lists them")
    top_k: int = Field(3, ge=1, le=1000, description="(label, probability) pairs per query")


class Hit(BaseModel):
    row: int
    path: str
    score: float = Field(..., description="cosine similarity")
    label: str
    split: str = ""


class SearchResponse(BaseModel):
    results: list[list[Hit]] = Field(..., description="one list of hits per query, best first")
    queries: list[dict[str, Any]] = Field(..., description="what each query was; 'error' when it failed")
    space: str
    k: int
    offset: int = 0
    exclude_self: bool
    where: dict[str, str]
    exact: bool = Field(..., description="true when the search did not use an index")
    index: dict[str, Any] | None
    available: int = Field(..., description="hits a query can have at most (after the filter, itself left out)")
    more: bool = Field(..., description="whether a next page (offset + k) has hits")
    notes: list[str]
    stages: dict[str, float] = Field(..., description="seconds spent per stage")
    generation: int = Field(..., description="the store generation the answer was computed on")


class Prediction(BaseModel):
    query: str
    label: str | None = None
    probability: float | None = None
    top: list[dict[str, Any]] = []
    error: str | None = None


class PredictResponse(BaseModel):
    head: str
    space: str
    model: str
    predictions: list[Prediction]
