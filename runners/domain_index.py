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
import threading
import time

import anyio
import bentoml
import numpy as np

from runners import INTERNAL_SERVICE, RUNNER_CONNECTION, die_with_server, exit_after_sigterm
from runners.encoder import EncoderService
from simserver import duplicate_checks, request_ids
from simserver import items as catalog_ops
from simserver.builder import decode_batch
from simserver.catalog import Catalog
from simserver.domain_config import DomainConfig
from simserver.encoder import IMAGE_SIZE
from simserver.errors import Conflict, RequestRefused, UnknownItem
from simserver.filters import parse_filter
from simserver.ingest import Dataset, iter_chunks, read_items, read_site
from simserver.live import LiveIndex
from simserver.repository import Repository
from simserver.schemas import (
    DeleteReply,
    DuplicateCalibration,
    DuplicateCheckReply,
    DuplicateGroupsReply,
    GroupPairsReply,
    IndexStatus,
    ItemInfo,
    ItemPage,
    ItemRecord,
    ItemsReply,
    MatchReply,
    RelevanceReply,
    SearchReply,
    SimilarityReply,
    VersionInfo,
)
from simserver.searcher import Searcher, served_encoder
from simserver.settings import get_settings
from simserver.store import open_store
from simserver.text_search import MAX_GROUP_SCAN, TextSearcher

logger = logging.getLogger(__name__)

# The longest an index service waits for its encoder before it says ready anyway.
WARM_UP_LIMIT_S = 300.0
GC_EVERY_S = 60.0


def service_name(domain: str) -> str:
    return f"index-{domain}"


def make_domain_service(cfg: DomainConfig) -> bentoml.Service:
    class DomainIndexService:
        encoder = bentoml.depends(EncoderService)

        def __init__(self) -> None:
            die_with_server()
            request_ids.install_log_filter()  # the gateway's request ids, as baggage
            exit_after_sigterm()
            settings = get_settings()
            repo = Repository(open_store(settings.store_uri, settings.store_cache_dir), cfg.catalog)
            self.repo = repo
            self.settings = settings
            self._maintaining = threading.Lock()  # one compaction / GC at a time in this process
            # asyncio locks: a second caller waits on the event loop, not in one of the 4 threads.
            self._groups_lock = asyncio.Lock()
            self._calibrating = asyncio.Lock()
            self._groups: DuplicateGroupsReply | None = None
            self._last_gc = 0.0
            self._loop = asyncio.get_event_loop()
            self.live = LiveIndex(repo, cfg.name, settings.pointer_poll_seconds, warm=self._warm_version)
            self.live.start()
            self.searcher = Searcher(cfg, lambda: self.live.current, self._encode, settings.encode_batch_size)
            self.texts = (
                TextSearcher(cfg, repo, lambda: self.live.current, self._encode, self._encode_text)
                if cfg.text is not None
                else None
            )
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
                        if self.texts is not None:
                            await self.texts.index(index)
                    break
                except Exception as exc:  # the encoder service may not be up yet: try again
                    logger.debug("domain %s: warm-up: %s", cfg.name, exc)
                    await asyncio.sleep(0.5)
            self._warm = True

        def _warm_version(self, index: Catalog) -> None:
            """Before a new version replaces the served one (in the poll thread, or the thread of a
            ``reload`` call; never the event loop's): its encoder loaded and run once."""
            probe = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            call = self._encode(probe, served_encoder(index, cfg))
            asyncio.run_coroutine_threadsafe(call, self._loop).result(timeout=WARM_UP_LIMIT_S)
            if self.texts is not None:  # its text vectors computed (and stored) before it is served
                built = self.texts.index(index)
                asyncio.run_coroutine_threadsafe(built, self._loop).result(timeout=WARM_UP_LIMIT_S)

        def __is_ready__(self) -> bool:
            # Bounded: a warm-up that keeps failing must not keep the server unready for ever.
            return self._warm or time.monotonic() - self._started > WARM_UP_LIMIT_S

        async def _encode(self, images: np.ndarray, encoder: str) -> np.ndarray:
            return await self.encoder.to_async.encode(images=images, encoder=encoder)

        async def _encode_text(self, texts: list[str], encoder: str) -> np.ndarray:
            return await self.encoder.to_async.encode_text(texts=texts, encoder=encoder)

        def _text_search(self) -> TextSearcher:
            if self.texts is None:
                raise RequestRefused(
                    f"domain {cfg.name!r} has no text configured: add text: {{fields: [title]}} to its yaml"
                )
            return self.texts

        def _changed(self) -> None:
            """After a commit: serve it at once, then compact and collect garbage in the background."""
            self.live.refresh()
            threading.Thread(target=self._maintain, name=f"maintain-{cfg.name}", daemon=True).start()

        def _maintain(self) -> None:
            if not self._maintaining.acquire(blocking=False):
                return
            try:
                while catalog_ops.compact(self.repo, cfg) is not None:
                    self.live.refresh()
                # GC lists the domain's blobs (every image): at most once a minute, not per change.
                if time.monotonic() - self._last_gc > GC_EVERY_S:
                    self._last_gc = time.monotonic()
                    self.repo.collect_garbage(cfg.name, cfg.versions.keep, cfg.versions.gc_grace_seconds)
            except Exception:
                logger.exception("domain %s: compaction / garbage collection failed", cfg.name)
            finally:
                self._maintaining.release()

        @bentoml.api
        async def search(
            self,
            image: np.ndarray,
            top_k: int,
            filter: dict | None = None,
            text: str | None = None,
            weights: dict | None = None,
            fusion: str | None = None,
        ) -> SearchReply:
            """Nearest items to one ``uint8 [S, S, 3]`` image, a text, or both (fused), in the
            version served now."""
            if text is None and weights is None and fusion is None:
                return await self.searcher.search(image, top_k, parse_filter(filter))
            # An empty array means no image: BentoML has no optional array parameters.
            pixels = image if image.size else None
            filt = parse_filter(filter)
            return await self._text_search().search(pixels, text, top_k, filt, weights, fusion)

        @bentoml.api
        async def match(
            self,
            image: np.ndarray,
            text: str | None = None,
            item_id: str | None = None,
            group: str | None = None,
            weights: dict | None = None,
            fusion: str | None = None,
            threshold: float | None = None,
        ) -> MatchReply:
            """The best match in each other group, with a same-product decision."""
            pixels = image if image.size else None
            return await self._text_search().match(pixels, text, item_id, group, weights, fusion, threshold)

        @bentoml.api
        async def match_groups(
            self,
            group: str,
            against: str,
            weights: dict | None = None,
            fusion: str | None = None,
            threshold: float | None = None,
            max_scan: int = MAX_GROUP_SCAN,
        ) -> GroupPairsReply:
            """Every item of one group with its best match in another."""
            return await self._text_search().match_groups(
                group, against, weights, fusion, threshold, max_scan
            )

        @bentoml.api
        async def pair(self, images: np.ndarray) -> SimilarityReply:
            """Two images compared with this domain's served encoder and metric."""
            return await self.searcher.pair(images)

        @bentoml.api
        def similar(self, item_id: str, top_k: int, filter: dict | None = None) -> SearchReply:
            """Neighbours of a stored item from its stored vector (no encoding), itself excluded."""
            return self.searcher.similar(item_id, top_k, parse_filter(filter))

        @bentoml.api
        async def upsert(
            self,
            archive: bytes | None = None,
            images: list[bytes] | None = None,
            names: list[str] | None = None,
            label: str | None = None,
            ids: list[str] | None = None,
            on_duplicate: str = "allow",
        ) -> ItemsReply:
            """Add or replace items by id: a zip (training layout) and/or files with one label;
            ``on_duplicate`` (allow, skip, reject): what to do with items that duplicate existing ones."""
            files = list(zip(names or [], images or [], strict=True))
            dataset = await anyio.to_thread.run_sync(
                read_items, archive, files, label, ids, cfg.limits, IMAGE_SIZE
            )

            def screen(head: Catalog, ds: Dataset, vectors: np.ndarray) -> tuple[list[int], list]:
                found = duplicate_checks.check_vectors(
                    head, cfg, ds.samples, vectors, duplicate_checks.stored_image(self.repo), exclude_ids=True
                )
                return duplicate_checks.screen(found, ds.samples, on_duplicate)

            reply, _ = await catalog_ops.upsert(
                self.repo, cfg, dataset, self._encode, self.settings.encode_batch_size, screen=screen
            )
            await anyio.to_thread.run_sync(self._changed)
            return reply

        @bentoml.api
        def delete(
            self, ids: list[str] | None = None, filter: dict | None = None, must_exist: bool = False
        ) -> DeleteReply:
            filt = parse_filter(filter) if filter is not None else None
            reply, _ = catalog_ops.delete(self.repo, cfg.name, ids, filt, must_exist)
            self._changed()
            return reply

        @bentoml.api
        def list_items(self, label: str | None = None, offset: int = 0, limit: int = 100) -> ItemPage:
            index = self.searcher._serving()
            filt = parse_filter({"label": label}) if label is not None else None
            return catalog_ops.page(cfg.name, index, filt, offset, limit)

        @bentoml.api
        def get_item(self, item_id: str) -> ItemRecord:
            index = self.searcher._serving()
            it = index.get(item_id)
            if it is None:
                raise UnknownItem(f"domain {cfg.name!r} has no item {item_id!r}")
            return catalog_ops.record(it)

        @bentoml.api
        def versions(self) -> list[VersionInfo]:
            return catalog_ops.version_infos(self.repo, cfg.name)

        @bentoml.api
        def activate(self, version: str) -> VersionInfo:
            catalog = self.repo.activate(cfg.name, version)
            self._changed()
            return next(
                v for v in catalog_ops.version_infos(self.repo, cfg.name) if v.version == catalog.version
            )

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

        # -- duplicates (simserver/duplicate_checks.py) ----------------------------------------------
        @bentoml.api
        async def check_duplicates(
            self,
            archive: bytes | None = None,
            images: list[bytes] | None = None,
            names: list[str] | None = None,
        ) -> DuplicateCheckReply:
            """Each uploaded image against the catalog: its nearest items verified, ``same_item``."""
            files = list(zip(names or [], images or [], strict=True))
            site = await anyio.to_thread.run_sync(read_site, archive, files, cfg.limits, IMAGE_SIZE)
            index = self.searcher._serving()
            if not len(index):
                raise Conflict(f"domain {cfg.name!r}: the catalog is empty, nothing to be a duplicate of")
            chunks = []
            for batch in iter_chunks(site.samples, self.settings.encode_batch_size):
                pixels = await anyio.to_thread.run_sync(decode_batch, batch)
                chunks.append(await self.searcher._vectors(index, pixels))
            results = await anyio.to_thread.run_sync(
                duplicate_checks.check_vectors,
                index,
                cfg,
                site.samples,
                np.concatenate(chunks),
                duplicate_checks.stored_image(self.repo),
            )
            threshold, calibrated = duplicate_checks.threshold_of(index, cfg)
            return DuplicateCheckReply(
                domain=cfg.name,
                version=index.version,
                threshold=threshold,
                calibrated=calibrated,
                results=results,
                skipped=site.skipped,
            )

        @bentoml.api
        async def duplicate_groups(self) -> DuplicateGroupsReply:
            """The whole catalog's duplicate groups (a task of the gateway's). One scan at a time,
            and its reply kept for the version it scanned: a version is immutable, so a second
            request for it (a client polling by resubmitting) costs nothing. Callers wait on the
            event loop, not in the service's threads, which the status and item calls need."""
            async with self._groups_lock:
                return await anyio.to_thread.run_sync(self._duplicate_groups)

        def _duplicate_groups(self) -> DuplicateGroupsReply:
            index = self.searcher._serving()
            if self._groups is None or self._groups.version != index.version:
                self._groups = duplicate_checks.groups(index, cfg, self.repo, cfg.name)
            return self._groups

        @bentoml.api
        async def calibrate_duplicates(self) -> DuplicateCalibration:
            """Calibrate the duplicate decision on the served catalog now; a new version (kind
            ``calibrate``) with the same items carries it. One calibration at a time, waiting on
            the event loop (as duplicate_groups); a served version already calibrated on its own
            rows with the same encoder and settings answers its calibration, with no new version."""
            async with self._calibrating:
                return await anyio.to_thread.run_sync(self._calibrate_duplicates)

        def _calibrate_duplicates(self) -> DuplicateCalibration:
            index = self.searcher._serving()
            encoder = served_encoder(index, cfg)
            basis = duplicate_checks.calibration_input(index, cfg, encoder)
            if index.meta.get("duplicates_input") == basis and index.meta.get("duplicates"):
                return DuplicateCalibration.model_validate(index.meta["duplicates"])

            def encode(pixels: np.ndarray) -> np.ndarray:
                call = self._encode(pixels, encoder)
                return asyncio.run_coroutine_threadsafe(call, self._loop).result(timeout=WARM_UP_LIMIT_S)

            result = duplicate_checks.calibrate_catalog(
                index, cfg, self.repo, encode, IMAGE_SIZE, self.settings.encode_batch_size
            )
            catalog_ops.set_meta(self.repo, cfg.name, "calibrate", duplicates=result, duplicates_input=basis)
            self._changed()
            return DuplicateCalibration.model_validate(result)

        @bentoml.api
        def item(self, item_id: str) -> ItemInfo:
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
    service = bentoml.service(
        name=service_name(cfg.name),
        workers=1,
        threads=4,  # the sync routes (status, item, reload) must not queue behind a slow reload
        traffic={"timeout": 900},  # a /relevance call encodes a whole site (up to max_entries images)
        runner_connection=RUNNER_CONNECTION,
        **INTERNAL_SERVICE,
    )(DomainIndexService)
    service.add_asgi_middleware(request_ids.BaggageIdMiddleware)
    return service
