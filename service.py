"""HTTP gateway: the API's table of contents. Routes and validation only; the work runs in the
services it depends on (``runners/``: an index service per domain, the trainer, the encoder) and
the plain modules of ``simserver``. Refusals are raised as :class:`simserver.errors.RequestRefused`
wherever they arise and reach the client as ``{"error": message}`` (:mod:`simserver.http_errors`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import anyio
import bentoml
import numpy as np
from fastapi import Depends, FastAPI, Query
from starlette.responses import Response

from runners import die_with_server
from runners.domain_index import make_domain_service
from runners.encoder import EncoderService
from runners.trainer import TrainerService
from simserver import metrics, request_ids, ui
from simserver.asgi import GatewayMiddleware, harden_multipart
from simserver.domain_config import BUILTIN, DomainConfig, Limits, load_domains
from simserver.errors import RequestRefused, UnknownDomain
from simserver.filters import parse_filter
from simserver.http_errors import Remote, json_refusals, known_query_only, quiet_refusals
from simserver.jobs import TASK_ID_PATTERN, JobRecords
from simserver.openapi import api_operations
from simserver.progress import training_progress
from simserver.repository import Repository
from simserver.schemas import (
    CatalogMode,
    DeleteReply,
    DomainInfo,
    DuplicateCalibration,
    DuplicateCheckReply,
    DuplicateGroupsReply,
    EncoderStats,
    FilterText,
    FusionName,
    GroupName,
    GroupPairsReply,
    ImageThreshold,
    ItemPage,
    ItemRecord,
    ItemsReply,
    MatchReply,
    MatchThreshold,
    Mode,
    Nearest,
    OnDuplicate,
    QueryText,
    RelevanceReply,
    SearchReply,
    SimilarityReply,
    SiteThreshold,
    TopK,
    TrainProgress,
    TrainReply,
    VersionInfo,
    WeightsText,
)
from simserver.settings import get_settings
from simserver.store import ArtifactStore, open_store
from simserver.text_search import (
    MAX_GROUP_SCAN,
    MAX_GROUP_SCAN_TASK,
    check_fusion,
    check_query_text,
    parse_weights,
    text_config,
)
from simserver.uploads import image_pixels, read_upload_async, upload_name, warm_up_decoding

logger = logging.getLogger(__name__)

harden_multipart()
quiet_refusals()
SETTINGS = get_settings()
# BentoML needs every dependency as a class attribute before bentoml.service(): one index service
# per domain, so the domains are read at import.
DOMAINS = load_domains(SETTINGS.domains_dir)
INDEX_SERVICES = {name: make_domain_service(cfg) for name, cfg in DOMAINS.items()}
_DEP_ATTR = {name: "index_" + name.replace("-", "_") for name in DOMAINS}
# "No image" to an index service (its array parameters cannot be optional in BentoML).
NO_IMAGE = np.zeros((0,), np.uint8)


@lru_cache(maxsize=1)
def artifact_store() -> ArtifactStore:
    """One store object per process, shared by the gateway and the middleware's job lookups."""
    return open_store(SETTINGS.store_uri, SETTINGS.store_cache_dir)


def domain_of(ctx: bentoml.Context) -> DomainConfig:
    name = ctx.request.path_params.get("domain", "")
    if name not in DOMAINS:
        raise UnknownDomain(f"unknown domain {name!r}")
    return DOMAINS[name]


class ImageSimilarity:
    encoder = bentoml.depends(EncoderService)
    trainer = bentoml.depends(TrainerService)

    def __init__(self) -> None:
        die_with_server()
        request_ids.install_log_filter()  # BentoML has configured its log handlers by now
        self.repo = Repository(artifact_store())
        self.jobs = JobRecords(artifact_store())
        # In a thread: listing the job records of a large S3 store must not delay start-up.
        threading.Thread(
            target=self.jobs.housekeeping,
            args=(get_settings().job_retention_days,),
            name="job-housekeeping",
            daemon=True,
        ).start()
        # The internal services, each call's refusals raised again here with their status.
        self.indexes = {name: Remote(getattr(self, attr)) for name, attr in _DEP_ATTR.items()}
        self.training = Remote(self.trainer)
        self.encoding = Remote(self.encoder)
        self._connected = False
        self._searched = False
        self._warming: asyncio.Future[None] | None = None

    async def __is_ready__(self) -> bool:
        """Ready once every index service has answered a call: the first search after ready then
        does not set up this process's connections to them (measured: 1.7x the warm p50 with it,
        against 2x allowed)."""
        if not self._connected:
            try:
                calls = (index.to_async.status() for index in self.indexes.values())
                await asyncio.wait_for(asyncio.gather(*calls), timeout=3)
            except Exception:  # not up yet: the next probe asks again
                return False
            self._connected = True
        if not self._searched:
            # One search per domain through the whole path (decode thread, the index's search call,
            # FAISS, the reply): the first client's search was 3x the warm p50 without it. One
            # warm-up for all probes: a probe that finds it still running (an index still loading
            # its encoder) waits for it a while, and the next probe waits again.
            if self._warming is None:
                self._warming = asyncio.ensure_future(self._warm_up_searches())
            done, _ = await asyncio.wait({self._warming}, timeout=10)
            if not done:
                return False
            if (exc := self._warming.exception()) is not None:  # readiness goes on, as for a fault
                logger.warning("warm-up searches failed: %r", exc)
            self._searched = True
        return True

    async def _warm_up_searches(self) -> None:
        pixels = await warm_up_decoding()
        await asyncio.gather(*(self._warm_up_search(name, pixels) for name in self.indexes))

    async def _warm_up_search(self, domain: str, pixels: np.ndarray) -> None:
        try:
            await self.indexes[domain].to_async.search(image=pixels, top_k=1, filter=None)
        except RequestRefused as exc:  # e.g. a domain with no version yet: nothing to warm
            logger.debug("warm-up search on %s: %s", domain, exc)
        except Exception:  # a fault shows in the first client's search too; readiness goes on
            logger.warning("warm-up search on %s failed", domain, exc_info=True)

    @bentoml.api(route="/{domain}/search")
    async def search(
        self,
        image: Path = None,  # type: ignore[assignment]
        top_k: TopK = None,
        filter: FilterText = None,
        text: QueryText = None,
        weights: WeightsText = None,
        fusion: FusionName = None,
        *,
        ctx: bentoml.Context,
    ) -> SearchReply:
        """Most similar indexed images to the uploaded one, best first; with ``filter``, the exact
        top-k among the items that match it. Domains with ``text`` configured also take a ``text``
        query, alone or with the image (fused by ``weights`` and ``fusion``)."""
        cfg = domain_of(ctx)
        filt = parse_filter(filter)  # a malformed filter is a 400 before the image is decoded
        hybrid = text is not None or weights is not None or fusion is not None
        w = None
        if hybrid:
            tc = text_config(cfg)
            check_query_text(text, tc)
            w = parse_weights(weights)
            check_fusion(w, fusion, tc)
        if image is None and text is None:
            raise RequestRefused("send an 'image' file" + (", a 'text', or both" if cfg.text else ""))
        pixels = await image_pixels(image, cfg.limits, "image") if image is not None else NO_IMAGE
        if not hybrid:
            return await self.indexes[cfg.name].to_async.search(
                image=pixels, top_k=top_k or cfg.top_k, filter=filt.to_json() if filt else None
            )
        return await self.indexes[cfg.name].to_async.search(
            image=pixels,
            top_k=top_k or cfg.top_k,
            filter=filt.to_json() if filt else None,
            text=text,
            weights=w,
            fusion=fusion,
        )

    @bentoml.api(route="/{domain}/items")
    async def add_items(
        self,
        archive: Path = None,  # type: ignore[assignment]
        images: list[Path] = None,  # type: ignore[assignment]
        label: str | None = None,
        ids: list[str] | None = None,
        on_duplicate: OnDuplicate = "allow",
        *,
        ctx: bentoml.Context,
    ) -> ItemsReply:
        """Add or replace items by id, without a training: a zip (``archive``, the training layout,
        optional ``metadata.csv`` with an ``id`` column) and/or ``images`` files with one ``label``
        (and optional ``ids``, one per file). Encoded with the encoder the domain serves.
        ``on_duplicate``: items that duplicate existing ones are added and listed (``allow``), left
        out and listed (``skip``), or the whole upload refused with a 409 (``reject``)."""
        cfg = domain_of(ctx)
        if archive is None and not images:
            raise RequestRefused(
                "send items as a zip in 'archive' and/or as files in 'images' (with a 'label')"
            )
        data = await read_upload_async(archive, cfg.limits, "archive") if archive is not None else None
        files = [await read_upload_async(p, cfg.limits, "images") for p in images or []]
        return await self.indexes[cfg.name].to_async.upsert(
            archive=data,
            images=files,
            names=[upload_name(p) for p in images or []],
            label=label,
            ids=ids,
            on_duplicate=on_duplicate,
        )

    @bentoml.api(route="/{domain}/items/delete")
    async def delete_items(
        self, ids: list[str] | None = None, filter: dict | None = None, *, ctx: bentoml.Context
    ) -> DeleteReply:
        """Delete items: JSON ``{"ids": [...]}`` or ``{"filter": {...}}`` (as on ``/search``)."""
        cfg = domain_of(ctx)
        if (ids is None) == (filter is None):
            raise RequestRefused('send exactly one of {"ids": [...]} or {"filter": {...}}')
        if filter is not None:
            if not filter:  # matches every item: a catalog emptied by a typo or a fuzzer
                raise RequestRefused("an empty filter matches every item: give at least one condition")
            filter = parse_filter(filter).to_json()
        return await self.indexes[cfg.name].to_async.delete(ids=ids, filter=filter)

    @bentoml.task(route="/{domain}/train")
    async def train(
        self,
        archive: Path,
        mode: Mode = None,
        catalog: CatalogMode = None,
        *,
        ctx: bentoml.Context,
    ) -> TrainReply:
        """Fine-tune, evaluate and index a zip of ``<category>/<image>`` (+ optional metadata.csv)
        as the domain's new version."""
        cfg = domain_of(ctx)
        task_id = getattr(ctx.request.state, "task_id", None)

        async def work() -> TrainReply:
            data = await read_upload_async(archive, cfg.limits, "archive")
            reply = await self.training.to_async.train(
                domain=cfg.name, archive=data, mode=mode, catalog=catalog, task_id=task_id
            )
            try:  # published already; the index service's poller would pick it up in seconds
                await self.indexes[cfg.name].to_async.reload()
            except Exception:
                logger.exception("domain %s: reload after publish failed", cfg.name)
            return reply

        return await self.jobs.run(task_id, cfg.name, work)

    @bentoml.api(route="/{domain}/relevance")
    async def relevance(
        self,
        # Plain `Path` with a None default: BentoML 1.4 converts uploads only for fields annotated
        # exactly `Path` / `list[Path]` (an `Optional[Path]` upload fails validation).
        archive: Path = None,  # type: ignore[assignment]
        images: list[Path] = None,  # type: ignore[assignment]
        image_threshold: ImageThreshold = None,
        site_threshold: SiteThreshold = None,
        nearest: Nearest = 3,
        *,
        ctx: bentoml.Context,
    ) -> RelevanceReply:
        """Does this supplier site sell the domain's target product? Send the site's images as a zip
        (``archive``, any layout) and/or as files (``images``). Each image is encoded once and scored
        by its nearest indexed images: target label versus the best other label."""
        cfg = domain_of(ctx)
        if not cfg.target_label:
            with_target = ", ".join(n for n, c in DOMAINS.items() if c.target_label) or "none configured"
            raise RequestRefused(
                f"domain {cfg.name!r} names no target_label: relevance is for domains that do ({with_target})"
            )
        if archive is None and not images:
            raise RequestRefused("send the site's images as a zip in 'archive' or as files in 'images'")
        data = await read_upload_async(archive, cfg.limits, "archive") if archive is not None else None
        files = [await read_upload_async(p, cfg.limits, "images") for p in images or []]
        return await self.indexes[cfg.name].to_async.relevance(
            archive=data,
            images=files,
            names=[upload_name(p) for p in images or []],
            image_threshold=image_threshold,
            site_threshold=site_threshold,
            nearest=nearest,
        )

    # -- duplicates (simserver/duplicates.py, duplicate_checks.py, duplicate_groups.py) ------------------
    @bentoml.api(route="/{domain}/duplicates/check")
    async def check_duplicates(
        self,
        image: Path = None,  # type: ignore[assignment]
        images: list[Path] = None,  # type: ignore[assignment]
        archive: Path = None,  # type: ignore[assignment]
        *,
        ctx: bentoml.Context,
    ) -> DuplicateCheckReply:
        """Is each uploaded image a copy of an item in the catalog (not merely a look-alike)? Send
        ``image``, repeated ``images`` or a zip in ``archive``: each one's nearest items, verified
        geometrically, with the calibrated probability ``same_item`` that it is the same item."""
        cfg = domain_of(ctx)
        if archive is None and not images and image is None:
            raise RequestRefused("send an 'image', files in 'images' or a zip in 'archive'")
        paths = ([image] if image is not None else []) + list(images or [])
        data = await read_upload_async(archive, cfg.limits, "archive") if archive is not None else None
        files = [await read_upload_async(p, cfg.limits, "images") for p in paths]
        return await self.indexes[cfg.name].to_async.check_duplicates(
            archive=data, images=files, names=[upload_name(p) for p in paths]
        )

    @bentoml.task(route="/{domain}/duplicates")
    async def duplicates(self, *, ctx: bentoml.Context) -> DuplicateGroupsReply:
        """Task: the whole catalog's duplicate groups, each with the item to keep, and every
        item to remove (batched kNN on the stored vectors, candidates verified)."""
        cfg = domain_of(ctx)

        async def work() -> DuplicateGroupsReply:
            return await self.indexes[cfg.name].to_async.duplicate_groups()

        return await self.jobs.run(
            getattr(ctx.request.state, "task_id", None), cfg.name, work, kind="duplicates"
        )

    @bentoml.api(route="/{domain}/duplicates/calibrate")
    async def calibrate_duplicates(self, *, ctx: bentoml.Context) -> DuplicateCalibration:
        """Calibrate the duplicate decision on the served catalog now (as every training does);
        a new version of kind ``calibrate`` carries it."""
        cfg = domain_of(ctx)
        return await self.indexes[cfg.name].to_async.calibrate_duplicates()

    @bentoml.api(route="/similarity")
    async def similarity(
        self,
        image_a: Path,
        image_b: Path,
        metric: Literal["cosine", "l1", "l2"] | None = None,
        domain: str | None = None,
    ) -> SimilarityReply:
        """Distance and score between two images: with the built-in encoder (``metric``, default
        cosine), or with a ``domain``'s served (fine-tuned) encoder and metric, answering also
        ``same_label`` from the pair threshold calibrated on its hold-out."""
        cfg = None
        if domain is not None:
            if domain not in DOMAINS:
                raise UnknownDomain(f"unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
            cfg = DOMAINS[domain]
            if metric is not None and metric != cfg.metric:
                raise RequestRefused(
                    f"metric: domain {domain!r} compares with {cfg.metric}; leave metric out"
                )
        limits = cfg.limits if cfg else Limits()
        pixels = [
            await image_pixels(image_a, limits, "image_a"),
            await image_pixels(image_b, limits, "image_b"),
        ]
        if cfg is not None:
            return await self.indexes[cfg.name].to_async.pair(images=np.stack(pixels))
        metric = metric or "cosine"
        a, b = await self.encoding.to_async.encode(images=np.stack(pixels), encoder=BUILTIN)
        d = metrics.pairwise_distance(metric, a, b)
        return SimilarityReply(metric=metric, distance=d, score=float(metrics.distance_to_score(metric, d)))

    # -- image + text: product matching across groups (domains with text.group) ------------------
    @bentoml.api(route="/{domain}/match")
    async def match(
        self,
        image: Path = None,  # type: ignore[assignment]
        text: QueryText = None,
        id: str | None = None,
        group: str | None = None,
        weights: WeightsText = None,
        fusion: FusionName = None,
        threshold: MatchThreshold = None,
        *,
        ctx: bentoml.Context,
    ) -> MatchReply:
        """The best match in each group other than the query's (``text.group`` column): a stored
        item (``id``) or an ``image`` and/or a ``text``; ``same_product`` when the pair's weighted
        image and text scores reach ``threshold``."""
        cfg = domain_of(ctx)
        tc = text_config(cfg)
        check_query_text(text, tc)
        w = parse_weights(weights)
        check_fusion(w, fusion, tc)
        if not tc.group:
            raise RequestRefused(f"domain {cfg.name!r} names no text.group column: matching is across groups")
        if id is None and image is None and text is None:
            raise RequestRefused("send an item 'id', or an 'image' and/or a 'text'")
        if id is not None and (image is not None or text is not None):
            raise RequestRefused("send either an item 'id' or an 'image'/'text', not both")
        pixels = await image_pixels(image, cfg.limits, "image") if image is not None else NO_IMAGE
        return await self.indexes[cfg.name].to_async.match(
            image=pixels, text=text, item_id=id, group=group, weights=w, fusion=fusion, threshold=threshold
        )

    @bentoml.task(route="/{domain}/match/groups")
    async def match_groups(
        self,
        group: GroupName,
        against: GroupName,
        weights: WeightsText = None,
        fusion: FusionName = None,
        threshold: MatchThreshold = None,
        *,
        ctx: bentoml.Context,
    ) -> GroupPairsReply:
        """Every item of ``group`` with its best match in ``against`` (both values of the domain's
        ``text.group`` column), from the stored vectors, best ``match_score`` first. A task
        (``/submit``, ``/status``, ``/get``) for the whole catalog; called directly, a synchronous
        answer for small ones (at most ``MAX_GROUP_SCAN`` comparisons)."""
        cfg = domain_of(ctx)
        tc = text_config(cfg)
        w = parse_weights(weights)
        check_fusion(w, fusion, tc)
        task_id = getattr(ctx.request.state, "task_id", None)

        async def work() -> GroupPairsReply:
            return await self.indexes[cfg.name].to_async.match_groups(
                group=group,
                against=against,
                weights=w,
                fusion=fusion,
                threshold=threshold,
                max_scan=MAX_GROUP_SCAN if task_id is None else MAX_GROUP_SCAN_TASK,
            )

        return await self.jobs.run(task_id, cfg.name, work, kind="match/groups")


# One dependency per domain index service; bentoml.service() collects them from the class.
for _name, _attr in _DEP_ATTR.items():
    setattr(ImageSimilarity, _attr, bentoml.depends(INDEX_SERVICES[_name]))

http_app = FastAPI(title="image-similarity: read-only routes", dependencies=[Depends(known_query_only)])
json_refusals(http_app)


# bentoml.service() and asgi_app() re-bind the class name to the BentoML Service wrapping it (the class
# must be complete, index dependencies included, first), a rebinding mypy refuses for a class.
ImageSimilarity = bentoml.service(  # type: ignore[misc]
    name="image-similarity",
    # One worker: the per-domain dependency clients live in this process; the heavy work runs in
    # the services it depends on.
    workers=1,
    traffic={"timeout": 900},
)(ImageSimilarity)
ImageSimilarity = bentoml.asgi_app(http_app, path="/")(ImageSimilarity)  # type: ignore[misc]
ImageSimilarity.add_asgi_middleware(  # type: ignore[attr-defined]  # a Service now; mypy still sees the class
    GatewayMiddleware,
    **GatewayMiddleware.options(DOMAINS, SETTINGS, job_lookup=lambda t: JobRecords(artifact_store()).get(t)),
    api_operations=lambda: api_operations(ImageSimilarity),
)


@http_app.get("/domains", response_model=list[DomainInfo], summary="Domains and what they serve")
async def list_domains() -> list[DomainInfo]:
    svc = bentoml.get_current_service()
    # Asked at once: one domain busy (a write, a reload) must not delay the others' answers.
    statuses = await asyncio.gather(*(svc.indexes[name].to_async.status() for name in DOMAINS))
    return [
        DomainInfo(
            name=n,
            description=c.description,
            encoder=c.encoder,
            metric=c.metric,
            top_k=c.top_k,
            **st.model_dump(),
        )
        for (n, c), st in zip(DOMAINS.items(), statuses, strict=True)
    ]


@http_app.get("/stats", response_model=EncoderStats, summary="Encoder batching since start")
async def stats() -> EncoderStats:
    """How concurrent encodes were batched together (calls per model run), since the server started."""
    return await bentoml.get_current_service().encoding.to_async.stats()


def _index(domain: str) -> Remote:
    if domain not in DOMAINS:
        raise UnknownDomain(f"unknown domain {domain!r}")
    return bentoml.get_current_service().indexes[domain]


_Doc = dict[int | str, dict[str, Any]]
_E400: _Doc = {400: {"description": "malformed parameter or filter"}}
_E404: _Doc = {404: {"description": "unknown domain, item or version"}}
_E409: _Doc = {409: {"description": "the domain has no version yet"}}
_EKEY: _Doc = {401: {"description": "API key missing"}, 403: {"description": "API key not accepted"}}


@http_app.get(
    "/{domain}/similar",
    response_model=SearchReply,
    summary="More like this: neighbours of a stored item",
    responses={**_E400, **_E404, **_E409},
)
async def similar(
    domain: str,
    id: str = Query(..., min_length=1, description="a stored item's id"),
    top_k: int | None = Query(None, ge=1, le=100, description="default: the domain's top_k"),
    filter: str | None = Query(None, description="JSON filter, as on /search"),
) -> SearchReply:
    """Neighbours of a stored item from its stored vector (no re-encoding), excluding the item itself."""
    filt = parse_filter(filter)
    return await _index(domain).to_async.similar(
        item_id=id, top_k=top_k or DOMAINS[domain].top_k, filter=filt.to_json() if filt else None
    )


@http_app.get(
    "/{domain}/items",
    response_model=ItemPage,
    summary="The catalog's items, a page at a time",
    responses={**_E400, **_E404, **_E409},
)
async def list_items(
    domain: str,
    label: str | None = None,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> ItemPage:
    return await _index(domain).to_async.list_items(label=label, offset=offset, limit=limit)


@http_app.get(
    "/{domain}/items/{item_id:path}",
    response_model=ItemRecord,
    summary="One item: id, name, label, metadata, created_at",
    responses={**_E404, **_E409},
)
async def get_item(domain: str, item_id: str) -> ItemRecord:
    return await _index(domain).to_async.get_item(item_id=item_id)


@http_app.delete(
    "/{domain}/items/{item_id:path}",
    response_model=DeleteReply,
    summary="Delete one item (404 if unknown)",
    responses={**_E404, **_E409, **_EKEY},
)
async def delete_item(domain: str, item_id: str) -> DeleteReply:
    return await _index(domain).to_async.delete(ids=[item_id], must_exist=True)


@http_app.get(
    "/{domain}/versions",
    response_model=list[VersionInfo],
    summary="The domain's versions, newest first",
    responses={**_E404},
)
async def list_versions(domain: str) -> list[VersionInfo]:
    return await _index(domain).to_async.versions()


@http_app.post(
    "/{domain}/versions/{version}/activate",
    response_model=VersionInfo,
    summary="Serve what an earlier (or later) version served: a rollback in one call",
    responses={**_E404, **_EKEY},
)
async def activate_version(domain: str, version: str) -> VersionInfo:
    return await _index(domain).to_async.activate(version=version)


@http_app.get(
    "/{domain}/images/{item_id:path}",
    summary="The stored image of an item",
    responses={200: {"content": {"image/*": {}}}, 404: {"description": "unknown domain or id"}},
)
async def get_image(domain: str, item_id: str, version: str | None = None) -> Response:
    """Pass the search's ``version`` to be sure the item still has the image it had then
    (409 if that version is no longer served)."""
    svc = bentoml.get_current_service()
    item = await _index(domain).to_async.item(item_id=item_id)
    if version is not None and version != item.version:
        raise RequestRefused(
            f"version {version} of {domain!r} is no longer served (now {item.version}); search again", 409
        )
    try:
        data = await anyio.to_thread.run_sync(svc.repo.image, item.image_key)
    except KeyError:
        raise RequestRefused(f"image of item {item_id!r} is missing from the store", 404) from None
    return Response(
        data,
        media_type=item.content_type,
        headers={
            # Percent-encoded: names come from archives and may hold non-latin-1 or control characters.
            "X-Item-Name": quote(item.name),
            "X-Item-Label": quote(item.label),
            "X-Index-Version": item.version,
        },
    )


# -- a training's progress, and the web interface (/ui) ------------------------------------------------
@http_app.get(
    "/{domain}/train/progress",
    response_model=TrainProgress,
    summary="A training's stage, images done / total, seconds and ETA",
    responses={**_E400, 404: {"description": "unknown domain or task"}},
)
async def train_progress(
    domain: str, task_id: str = Query(..., pattern=TASK_ID_PATTERN, description="from /train/submit")
) -> TrainProgress:
    """From the artifact store, so any replica answers (the trainer writes it as it goes)."""
    _index(domain)
    reply = await anyio.to_thread.run_sync(training_progress, artifact_store(), domain, task_id)
    return TrainProgress(**reply)


ui.mount(http_app)
