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


class RetrievalMetrics(BaseModel):
    recall_at_1: float = Field(
        description="share of hold-out queries whose nearest training image has their label"
    )
    recall_at_5: float
    map_at_r: float = Field(
        description="mean average precision at R (R = training images of the query's label)"
    )
    per_class_recall_at_1: dict[str, float]
    queries: int


class Evaluation(BaseModel):
    mode: str
    pretrained: RetrievalMetrics | None = Field(description="the domain's configured encoder on the hold-out")
    finetuned: RetrievalMetrics | None = Field(description="backbone + fine-tuned head on the hold-out")
    promoted: bool = Field(description="whether this version serves the fine-tuned encoder")
    reason: str
    holdout_images: int
    train_images: int
    augmented_views: int
    seconds: dict[str, float]


class TrainResponse(BaseModel):
    version: str
    indexed: int
    skipped: list[SkippedFile]
    labels: dict[str, int]
    seconds: float
    encoder: str | None = Field(None, description="encoder spec this version serves with")
    encoder_id: str | None = None
    evaluation: Evaluation | None = None
    relevance: dict | None = Field(
        None, description="domains with a target_label: the calibrated image_threshold and how it was found"
    )


class Neighbour(BaseModel):
    id: int
    label: str
    score: float


class SiteImage(BaseModel):
    name: str = Field(description="path in the archive, or the uploaded file's name")
    similarity: float = Field(
        description="score of the nearest target-label image among the k nearest (0 if none)"
    )
    margin: float = Field(description="similarity minus the score of the nearest image of another label")
    similar: bool = Field(description="margin >= image_threshold")
    nearest: list[Neighbour]


class RelevanceResponse(BaseModel):
    domain: str
    version: str
    relevant: bool = Field(description="fraction >= site_threshold")
    fraction: float = Field(description="share of the site's usable images that are similar to the target")
    target: str
    image_threshold: float = Field(description="margin threshold (calibrated at training, or the request's)")
    site_threshold: float
    images: list[SiteImage]
    skipped: list[SkippedFile]


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
    serving_encoder: str | None = Field(None, description="encoder of the served version (fine-tuned or not)")
    evaluation: Evaluation | None = None
    store_error: str | None = None


class BatchingStats(BaseModel):
    runs: int = Field(description="model runs")
    calls: int = Field(description="encode calls served (one per search)")
    rows: int = Field(description="images encoded")
    calls_per_run: dict[str, int] = Field(description="histogram: calls batched together -> runs")


class EncoderStats(BaseModel):
    batching: dict[str, BatchingStats] = Field(description="per base encoder (fine-tuned ones share it)")
    export_templates_ready: bool


class ErrorResponse(BaseModel):
    error: str
