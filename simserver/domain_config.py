"""Per-domain configuration: ``domains/<name>.yaml`` validated into a frozen model."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from simserver.catalog import CatalogPolicy
from simserver.duplicates import DuplicatesConfig
from simserver.finetune import TrainingConfig
from simserver.index_choice import IndexPolicy
from simserver.metrics import Metric
from simserver.preprocess import DEFAULT_MAX_DECODED_BYTES
from simserver.relevance import RelevanceConfig
from simserver.runtime_choice import EncoderRuntimeConfig
from simserver.settings import PROJECT_ROOT
from simserver.text_config import TextConfig

DOMAIN_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Taken by the server itself: the web interface is mounted at /ui, so /ui/search would never reach
# a domain named `ui`.
RESERVED_NAMES = frozenset({"ui"})
BUILTIN = "builtin"


class Limits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_upload_bytes: int = Field(200 * 2**20, ge=1, description="size of one uploaded image or zip")
    max_entries: int = Field(10_000, ge=1, description="files in one training zip")
    max_uncompressed_bytes: int = Field(1 * 2**30, ge=1, description="sum of a zip's uncompressed sizes")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width*height of one image")
    max_decoded_bytes: int = Field(
        DEFAULT_MAX_DECODED_BYTES,
        ge=1,
        description="width*height*bytes per pixel of one decoded image, checked before decoding",
    )
    max_entry_bytes: int = Field(
        64 * 2**20, ge=1, description="uncompressed size of one zip entry, read from its header"
    )
    max_request_pixels: int = Field(
        400_000_000,
        ge=1,
        description="sum of width*height over one multi-image request (a site's images), before decoding",
    )


class VersionsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keep: int = Field(10, ge=1, description="versions kept; older ones and blobs only they use are deleted")
    gc_grace_seconds: float = Field(
        600.0,
        ge=0,
        description="blobs younger than this are never deleted (another replica may be using them)",
    )


class DomainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    encoder: str = Field(
        BUILTIN,
        description="'builtin', a TF Hub handle (https://tfhub.dev/... or https://www.kaggle.com/models/...) "
        "or a local SavedModel folder",
    )
    metric: Metric = "cosine"
    top_k: int = Field(5, ge=1, le=100)
    target_label: str | None = None
    demo_data: Path | None = Field(None, description="folder of <category>/<image>, relative to the repo")
    limits: Limits = Limits()
    index: IndexPolicy = IndexPolicy()
    training: TrainingConfig = TrainingConfig()
    relevance: RelevanceConfig = RelevanceConfig()
    catalog: CatalogPolicy = CatalogPolicy()
    versions: VersionsConfig = VersionsConfig()
    encoder_runtime: EncoderRuntimeConfig = EncoderRuntimeConfig()
    text: TextConfig | None = Field(None, description="image + text search: the items' text fields")
    duplicates: DuplicatesConfig = DuplicatesConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DOMAIN_NAME.match(v):
            raise ValueError("domain names are lower-case letters, digits and '-', at most 63 characters")
        if v in RESERVED_NAMES:
            raise ValueError(f"{v!r} is reserved: the server's own routes use /{v}/")
        return v

    def demo_path(self) -> Path | None:
        if self.demo_data is None:
            return None
        return self.demo_data if self.demo_data.is_absolute() else PROJECT_ROOT / self.demo_data


def load_domain(path: Path) -> DomainConfig:
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("name", path.stem)
    if raw["name"] != path.stem:
        raise ValueError(f"{path}: name {raw['name']!r} must match the file name")
    return DomainConfig.model_validate(raw)


def load_domains(folder: Path) -> dict[str, DomainConfig]:
    """All ``*.yaml`` in ``folder``, sorted by name; a broken file fails loudly at start-up."""
    return {p.stem: load_domain(p) for p in sorted(Path(folder).glob("*.yaml"))}
