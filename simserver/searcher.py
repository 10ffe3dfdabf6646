"""A domain's search: encode with the encoder of the version being served, then search that same
version, so a reply never mixes two versions.

The index service (``runners/domain_index.py``) wraps this for HTTP, with the encoder service as
``encode``; the CLI wraps it with an in-process encoder pool. Nothing here knows about BentoML.

Async, because ``encode`` is a call to another service: a worker thread blocked on a sync call
to the event loop it runs under deadlocks that loop's shutdown (seen: SIGTERM ignored with
searches in flight). CPU work on many rows runs in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import numpy as np

from simserver import metrics
from simserver.builder import decode_batch
from simserver.catalog import Catalog
from simserver.domain_config import DomainConfig
from simserver.errors import Conflict, RequestRefused, UnknownItem
from simserver.filters import Filter
from simserver.ingest import Dataset, iter_chunks
from simserver.relevance import judge_site
from simserver.schemas import Evaluation, IndexStatus, ItemInfo, RelevanceReply, SearchReply, SimilarityReply

logger = logging.getLogger(__name__)

# (uint8 images [N, S, S, 3], encoder) -> float32 [N, D]
EncodeFn = Callable[[np.ndarray, str], Awaitable[np.ndarray]]


def served_encoder(index: Catalog, cfg: DomainConfig) -> str:
    """The encoder a version's vectors came from: a fine-tuned version names its own; versions
    written before the encoder was recorded used the domain's configured one."""
    return index.encoder or cfg.encoder


class Searcher:
    def __init__(
        self,
        cfg: DomainConfig,
        current: Callable[[], Catalog | None],
        encode: EncodeFn,
        batch_size: int = 32,
    ) -> None:
        """``current``: the version served right now (read once per request)."""
        self.cfg = cfg
        self.current = current
        self.encode = encode
        self.batch_size = batch_size

    def _serving(self) -> Catalog:
        index = self.current()
        if index is None:
            raise Conflict(f"domain {self.cfg.name!r} has no index yet: train it first")
        return index

    async def _vectors(self, index: Catalog, images: np.ndarray) -> np.ndarray:
        vectors = np.asarray(await self.encode(images, served_encoder(index, self.cfg)), dtype=np.float32)
        if vectors.shape[-1] != index.dim:
            raise Conflict(
                f"domain {self.cfg.name!r}: index version {index.version} was built with "
                f"{index.meta['encoder_id']} ({index.dim}-d) but the encoder gives "
                f"{vectors.shape[-1]}-d vectors: retrain"
            )
        return vectors

    async def search(self, image: np.ndarray, top_k: int, filt: Filter | None = None) -> SearchReply:
        """Nearest items to one image (``uint8 [S, S, 3]`` or ``[1, S, S, 3]``) among those
        matching ``filt``, best first."""
        index = self._serving()
        pixels = np.asarray(image, dtype=np.uint8).reshape((1, *np.shape(image)[-3:]))
        vectors = await self._vectors(index, pixels)
        if filt:  # evaluating a filter over a large catalog takes milliseconds: off the event loop
            results = (await anyio.to_thread.run_sync(index.search, vectors, top_k, filt))[0]
        else:  # one query: FAISS takes a millisecond or so, less than a hop to a worker thread
            results = index.search(vectors, top_k)[0]
        return SearchReply(domain=self.cfg.name, version=index.version, results=results)

    async def pair(self, images: np.ndarray) -> SimilarityReply:
        """Two images (``uint8 [2, S, S, 3]``) compared with the served encoder and the domain's
        metric; ``same_label`` from the pair threshold calibrated at training, if any."""
        index = self._serving()
        a, b = await self._vectors(index, np.asarray(images, dtype=np.uint8))
        d = metrics.pairwise_distance(self.cfg.metric, a, b)
        threshold = (index.meta.get("pair") or {}).get("threshold")
        return SimilarityReply(
            metric=self.cfg.metric,
            distance=d,
            score=float(metrics.distance_to_score(self.cfg.metric, d)),
            domain=self.cfg.name,
            version=index.version,
            same_label=None if threshold is None else bool(d <= threshold),
            threshold=threshold,
        )

    def similar(self, item_id: str, top_k: int, filt: Filter | None = None) -> SearchReply:
        """ "More like this": neighbours of a stored item from its stored vector, itself excluded."""
        index = self._serving()
        vector = index.vector(item_id)
        if vector is None:
            raise UnknownItem(f"domain {self.cfg.name!r} has no item {item_id!r}")
        results = index.search(vector[None], top_k, filt, exclude=item_id)[0]
        return SearchReply(domain=self.cfg.name, version=index.version, results=results)

    async def relevance(
        self,
        site: Dataset,
        *,
        image_threshold: float | None = None,
        site_threshold: float | None = None,
        nearest: int = 3,
    ) -> RelevanceReply:
        """Does this site sell the domain's target product? Each image encoded once, in batches."""
        target = self.cfg.target_label
        if not target:
            raise RequestRefused(
                f"domain {self.cfg.name!r} names no target_label: relevance is for domains that do"
            )
        index = self._serving()
        indexed = index.meta.get("labels") or {}
        if target not in indexed:
            raise Conflict(
                f"domain {self.cfg.name!r} decides relevance for target label {target!r}, but the version "
                f"it serves ({index.version}) has no {target!r} images (labels: "
                f"{', '.join(indexed) or 'none'}): train it with a {target}/ folder of images"
            )
        rc = self.cfg.relevance
        chunks = []
        for batch in iter_chunks(site.samples, self.batch_size):
            pixels = await anyio.to_thread.run_sync(decode_batch, batch)
            chunks.append(await self._vectors(index, pixels))
        vectors = np.concatenate(chunks)
        results = await anyio.to_thread.run_sync(index.search, vectors, rc.top_k)
        verdict = judge_site(
            [s.name for s in site.samples],
            results,
            target,
            rc,
            calibration=index.meta.get("relevance"),
            image_threshold=image_threshold,
            site_threshold=site_threshold,
            nearest=nearest,
            vectors=vectors,
        )
        return RelevanceReply(
            domain=self.cfg.name, version=index.version, skipped=site.skipped, **verdict.model_dump()
        )

    def item(self, item_id: str) -> ItemInfo:
        index = self.current()
        it = index.get(item_id) if index is not None else None
        if index is None or it is None:
            raise UnknownItem(f"domain {self.cfg.name!r} has no item {item_id!r} in its current version")
        return ItemInfo(
            version=index.version,
            id=item_id,
            name=it.name,
            label=it.label,
            image_key=it.image_key,
            content_type=it.media_type,
        )

    def status(self, store_error: str | None = None) -> IndexStatus:
        index = self.current()
        if index is None:
            return IndexStatus(version=None, store_error=store_error)
        meta = index.meta
        evaluation = meta.get("evaluation")
        return IndexStatus(
            version=index.version,
            count=len(index),
            labels=meta.get("labels") or index.labels(),
            encoder_id=meta.get("encoder_id"),
            serving_encoder=served_encoder(index, self.cfg),
            evaluation=Evaluation.model_validate(evaluation) if evaluation else None,
            created_at=meta.get("created_at"),
            store_error=store_error,
            runtime=meta.get("runtime"),
            duplicates=meta.get("duplicates"),
        )
