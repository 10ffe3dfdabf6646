"""``text:`` in a domain's yaml: which metadata columns are an item's text, which text encoder
reads them, and how text and image scores are fused (see :mod:`simserver.hybrid`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fusion = Literal["weighted", "rrf"]
FUSIONS: tuple[str, ...] = ("weighted", "rrf")


class Weights(BaseModel):
    """How much each modality counts in a fused score (normalised by their sum)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: float = Field(0.5, ge=0, le=1000, allow_inf_nan=False, description="weight of the image score")
    text: float = Field(0.5, ge=0, le=1000, allow_inf_nan=False, description="weight of the text score")

    @model_validator(mode="after")
    def _positive(self) -> Weights:
        if not self.image + self.text > 0:
            raise ValueError("weights must sum to a positive number (image + text > 0)")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fields: list[str] = Field(min_length=1, description="metadata.csv columns joined into an item's text")
    encoder: str = Field("builtin", description="'builtin' (MiniLM, offline) or a TF Hub text handle")
    lexical: float = Field(
        0.5, ge=0, le=1, description="share of the character TF-IDF cosine in the text score (rest: encoder)"
    )
    weights: Weights = Weights()
    fusion: Fusion = "weighted"
    candidates: int = Field(100, ge=1, le=10_000, description="candidates per modality before fusion")
    group: str | None = Field(None, description="metadata column naming an item's group (e.g. shop)")
    product: str | None = Field(None, description="metadata column naming the product (for evaluation)")
    match_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="/match: same product when the weighted absolute score reaches this (bench match: 0.498)",
    )
    max_query_chars: int = Field(1000, ge=1, description="longest text query accepted")
