"""Process settings from environment variables (see .env.example)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    store_uri: str = Field("file://./var/store", description="file://PATH or s3://bucket/prefix")
    store_cache_dir: Path = Field(
        PROJECT_ROOT / "var" / "cache", description="local copies of immutable S3 objects (versions, images)"
    )
    api_key: str = Field("", description="comma-separated keys; when set, training needs Bearer <key>")
    search_requires_key: bool = Field(False, description="also require the key for search and reads")
    domains_dir: Path = Field(PROJECT_ROOT / "domains", description="folder of <domain>.yaml files")
    builtin_model: str = Field(
        "efficientnet-lite0-imagenet", description="BentoML model name of the built-in encoder"
    )
    pointer_poll_seconds: float = Field(2.0, gt=0, description="how often workers look for a new version")
    encode_batch_size: int = Field(32, ge=1, le=256)
    encoder_runtime: Literal["auto", "tflite", "savedmodel"] = Field(
        "auto", description="auto: TFLite/XNNPACK when it reproduces the SavedModel, else TF"
    )
    max_heavy_requests: int = Field(
        2,
        ge=1,
        le=64,
        description="/relevance and item uploads at once per gateway; 429 + Retry-After beyond",
    )
    max_concurrent_decodes: int = Field(
        4, ge=1, le=64, description="uploaded images the gateway decodes at once (each up to ~200 MB)"
    )
    encoder_threads: int = Field(
        0, ge=0, le=256, description="TFLite threads; 0: every CPU the process may use"
    )
    job_retention_days: float = Field(
        7.0,
        gt=0,
        le=3650,
        description="finished task records (jobs/, progress/) older than this are deleted",
    )


def api_keys(settings: Settings) -> list[str]:
    return [k.strip() for k in settings.api_key.split(",") if k.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
