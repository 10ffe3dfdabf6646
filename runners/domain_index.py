"""Per-domain index services, one per ``domains/*.yaml``, made by :func:`make_domain_service`.

Each holds only FAISS and NumPy (no TensorFlow), serves its domain's current version and follows
the domain pointer in the artifact store.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import bentoml
import numpy as np

from runners import INTERNAL_SERVICE, RUNNER_CONNECTION
from simserver.domain_config import DomainConfig
from simserver.live import LiveIndex
from simserver.repository import Repository
from simserver.settings import get_settings
from simserver.store import open_store

logger = logging.getLogger(__name__)


def service_name(domain: str) -> str:
    return f"index-{domain}"


def make_domain_service(cfg: DomainConfig) -> bentoml.Service:
    class DomainIndexService:
        domain = cfg.name

        def __init__(self) -> None:
            settings = get_settings()
            self.live = LiveIndex(
                Repository(open_store(settings.store_uri, settings.store_cache_dir)),
                cfg.name,
                settings.pointer_poll_seconds,
            )
            self.live.start()

        def __is_ready__(self) -> bool:
            return True

        def _unusable(self, index, dim: int, encoder: str | None, empty: str) -> dict | None:
            """The answer when vectors from ``encoder`` (``dim``-d) cannot be searched in ``index``:
            another encoder serves this version (the caller encodes again with the one named), or
            the dimensions differ (retrain). None when they can."""
            served = index.meta.get("encoder") or cfg.encoder
            if encoder is not None and encoder != served:
                return {"version": index.version, empty: [], "encoder": served}
            if dim != index.dim:
                return {
                    "version": index.version,
                    empty: [],
                    "encoder": served,
                    "error": f"index version {index.version} was built with {index.meta['encoder_id']} "
                    f"({index.dim}-d) but the encoder gives {dim}-d vectors: retrain",
                }
            return None

        @bentoml.api
        def search(self, vector: np.ndarray, top_k: int, encoder: str | None = None) -> dict:
            """``encoder``: the spec the caller encoded with; if the served version was built with
            another, no results and that version's spec, so the caller can encode again."""
            index = self.live.current
            if index is None:
                return {"version": None, "results": []}
            refused = self._unusable(index, vector.shape[-1], encoder, "results")
            if refused:
                return refused
            return {
                "version": index.version,
                "encoder": index.meta.get("encoder") or cfg.encoder,
                "results": [asdict(h) for h in index.search(vector, top_k)],
            }

        @bentoml.api
        def neighbours(self, vectors: np.ndarray, k: int, encoder: str | None = None) -> dict:
            """Top-k (id, label, score) of each vector, and the version's relevance calibration;
            ``encoder`` as in :meth:`search`."""
            index = self.live.current
            if index is None:
                return {"version": None, "hits": []}
            refused = self._unusable(index, vectors.shape[-1], encoder, "hits")
            if refused:
                return refused
            hits = [
                [{"id": h.id, "label": h.label, "score": h.score} for h in row]
                for row in index.search_many(vectors, k)
            ]
            return {
                "version": index.version,
                "encoder": index.meta.get("encoder") or cfg.encoder,
                "hits": hits,
                "relevance": index.meta.get("relevance"),
            }

        @bentoml.api
        def item(self, item_id: int) -> dict:
            index = self.live.current
            if index is None or not 0 <= item_id < len(index):
                return {}
            it = index.items[item_id]
            return {
                "version": index.version,
                "id": item_id,
                "name": it.name,
                "label": it.label,
                "image_key": it.image_key,
                "media_type": it.media_type,
            }

        @bentoml.api
        def info(self) -> dict:
            index = self.live.current
            meta = dict(index.meta) if index is not None else {}
            return {
                "version": meta.get("version"),
                "count": meta.get("count", 0),
                "labels": meta.get("labels", {}),
                "encoder_id": meta.get("encoder_id"),
                "serving_encoder": (meta.get("encoder") or cfg.encoder) if index is not None else None,
                "evaluation": meta.get("evaluation"),
                "created_at": meta.get("created_at"),
                "store_error": self.live.last_error,
            }

        @bentoml.api
        def reload(self) -> dict:
            """Called by the gateway right after a training publishes, so the caller sees it at once."""
            self.live.refresh()
            index = self.live.current
            return {"version": index.version if index else None}

    DomainIndexService.__name__ = DomainIndexService.__qualname__ = "Index_" + cfg.name.replace("-", "_")
    return bentoml.service(
        name=service_name(cfg.name),
        workers=1,
        threads=4,  # FAISS releases the GIL; BentoML's default of 1 thread serializes searches
        traffic={"timeout": 120},
        runner_connection=RUNNER_CONNECTION,
        **INTERNAL_SERVICE,
    )(DomainIndexService)
