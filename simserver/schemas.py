"""Pydantic response models of the HTTP API (they also document it in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SearchHit(BaseModel):
    id: int = Field(description="item id in this version; GET /{domain}/images/{id} returns its image")
    name: str = Field(description="path of the image in the training set, <category>/<file>")
    label: str = Field(description="category folder the image came from")
    score: float = Field(ge=0, le=1, description="1 = identical image, 0 = unrelated")
    distance: float = Field(description="raw distance in the domain's metric (0 = identical)")
    metadata: dict[str, str] = Field(default_factory=dict, description="row of metadata.csv, if any")


class SearchResponse(BaseModel):
    domain: str
    version: str
    results: list[SearchHit]


class SkippedFile(BaseModel):
    name: str
    reason: str


class TrainResponse(BaseModel):
    version: str
    indexed: int
    skipped: list[SkippedFile]
    labels: dict[str, int]
    seconds: float


class SimilarityResponse(BaseModel):
    metric: str
    distance: float
    score: float = Field(ge=0, le=1)


class DomainInfo(BaseModel):
    name: str
    description: str
    version: str | None
    count: int
    encoder: str
    encoder_id: str | None
    metric: str
    top_k: int
    labels: dict[str, int]
    created_at: str | None
    store_error: str | None = None


class ErrorResponse(BaseModel):
    error: str
