"""Per-domain index services, one per ``domains/*.yaml``, made by :func:`make_domain_service`.

A domain's index service owns its search: it serves the domain's current version (following the
domain pointer in the artifact store), encodes queries through the encoder service with the
encoder *that version* needs, and searches that same version (:class:`simserver.searcher.Searcher`).
The gateway sends pixels and parameters and never learns which encoder a version needs.
It holds only FAISS and NumPy; TensorFlow lives in the encoder service.
"""

from __future__ import annotations

import asyncio
import logging
import time

import anyio
import bentoml
import numpy as np

from runners import INTERNAL_SERVICE, RUNNER_CONNECTION, die_with_server, exit_after_sigterm
from runners.encoder import EncoderService
from simserver.domain_config import DomainConfig
from simserver.encoder import IMAGE_SIZE
from simserver.index import DomainIndex
from simserver.ingest import read_site
from simserver.live import LiveIndex
from simserver.repository import Repository
from simserver.schemas import IndexStatus, ItemInfo, RelevanceReply, SearchReply
from simserver.searcher import Searcher, served_encoder
from simserver.settings import get_settings
from simserver.store import open_store

logger = logging.getLogger(__name__)

# The longest an index service waits for its encoder before it says ready anyway.
WARM_UP_LIMIT_S = 300.0


def service_name(domain: str) -> str:
    return f"index-{domain}"


def make_domain_service(cfg: DomainConfig) -> bentoml.Service:
    class DomainIndexService:
        encoder = bentoml.depends(EncoderService)

        def __init__(self) -> None:
            die_with_server()
            exit_after_sigterm()
            settings = get_settings()
            repo = Repository(open_store(settings.store_uri, settings.store_cache_dir))
            self._loop = asyncio.get_event_loop()
            self.live = LiveIndex(repo, cfg.name, settings.pointer_poll_seconds, warm=self._warm_version)
            self.live.start()
            self.searcher = Searcher(cfg, lambda: self.live.current, self._encode, settings.encode_batch_size)
            self._started = time.monotonic()
            self._warm = False
            # Not ready until the encoder the served version needs is loaded and has run once: a
            # fine-tuned one otherwise loads on the first search (measured: 8.8 s after "ready").
            self._warming = asyncio.get_event_loop().create_task(self._warm_up())

        async def _warm_up(self) -> None:
            probe = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            while time.monotonic() - self._started < WARM_UP_LIMIT_S:
                index = self.live.current
                try:
                    if index is not None:
                        await self._encode(probe, served_encoder(index, cfg))
                    break
                except Exception as exc:  # the encoder service may not be up yet: try again
                    logger.debug("domain %s: warm-up: %s", cfg.name, exc)
                    await asyncio.sleep(0.5)
            self._warm = True

        def _warm_version(self, index: DomainIndex) -> None:
            """Before a new version replaces the served one (in the poll thread, or the thread of a
            ``reload`` call; never the event loop's): its encoder loaded and run once."""
            probe = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            call = self._encode(probe, served_encoder(index, cfg))
            asyncio.run_coroutine_threadsafe(call, self._loop).result(timeout=WARM_UP_LIMIT_S)

        def __is_ready__(self) -> bool:
            # Bounded: a warm-up that keeps failing must not keep the server unready for ever.
            return self._warm or time.monotonic() - self._started > WARM_UP_LIMIT_S

        async def _encode(self, images: np.ndarray, encoder: str) -> np.ndarray:
            return await self.encoder.to_async.encode(images=images, encoder=encoder)

        @bentoml.api
        async def search(self, image: np.ndarray, top_k: int) -> SearchReply:
            """Nearest items to one ``uint8 [S, S, 3]`` image in the version served now."""
            return await self.searcher.search(image, top_k)

        @bentoml.api
        async def relevance(
            self,
            archive: bytes | None = None,
            images: list[bytes] | None = None,
            names: list[str] | None = None,
            image_threshold: float | None = None,
            site_threshold: float | None = None,
            nearest: int = 3,
        ) -> RelevanceReply:
            """A supplier site's verdict: ``archive`` (a zip, any layout) and/or ``images`` (one
            file each, named by ``names``), each image encoded once."""
            files = list(zip(names or [], images or [], strict=True))
            site = await anyio.to_thread.run_sync(read_site, archive, files, cfg.limits, IMAGE_SIZE)
            return await self.searcher.relevance(
                site, image_threshold=image_threshold, site_threshold=site_threshold, nearest=nearest
            )

        @bentoml.api
        def item(self, item_id: int) -> ItemInfo:
            return self.searcher.item(item_id)

        @bentoml.api
        def status(self) -> IndexStatus:
            return self.searcher.status(self.live.last_error)

        @bentoml.api
        def reload(self) -> IndexStatus:
            """Called by the gateway right after a training publishes, so the caller sees it at once."""
            self.live.refresh()
            return self.searcher.status(self.live.last_error)

    DomainIndexService.__name__ = DomainIndexService.__qualname__ = "Index_" + cfg.name.replace("-", "_")
    return bentoml.service(
        name=service_name(cfg.name),
        workers=1,
        threads=4,  # the sync routes (status, item, reload) must not queue behind a slow reload
        traffic={"timeout": 900},  # a /relevance call encodes a whole site (up to max_entries images)
        runner_connection=RUNNER_CONNECTION,
        **INTERNAL_SERVICE,
    )(DomainIndexService)
