"""HTTP gateway: routes and validation only; the work lives in ``simserver`` and ``runners``.

Routes (the contract): ``POST /{domain}/search``, task ``/{domain}/train`` (``/submit``,
``/status``, ``/get``), ``POST /{domain}/relevance``, ``POST /similarity``,
``GET /{domain}/images/{id}``, ``GET /domains``.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI
from pydantic import Field
from starlette.responses import JSONResponse, Response

from runners.domain_index import make_domain_service
from runners.encoder import EncoderService, EncoderServiceBackend
from simserver import metrics
from simserver.asgi import GatewayMiddleware, harden_multipart
from simserver.builder import decode_batch
from simserver.domain_config import BUILTIN, Limits, load_domains
from simserver.encoder import IMAGE_SIZE
from simserver.errors import ClientError, Conflict, TooLarge, UnknownDomain
from simserver.ingest import Dataset, read_site, read_zip
from simserver.jobs import JobRecords
from simserver.preprocess import prepare
from simserver.relevance import judge_site
from simserver.repository import Repository
from simserver.schemas import (
    DomainInfo,
    EncoderStats,
    RelevanceResponse,
    SearchResponse,
    SimilarityResponse,
    TrainResponse,
)
from simserver.settings import api_keys, get_settings
from simserver.store import open_store
from simserver.training import FeatureCache, train_domain

logger = logging.getLogger(__name__)

harden_multipart()
SETTINGS = get_settings()
# One store object per process, shared by the gateway instance and the middleware's job lookups.
STORE = open_store(SETTINGS.store_uri, SETTINGS.store_cache_dir)
DOMAINS = load_domains(SETTINGS.domains_dir)
INDEX_SERVICES = {name: make_domain_service(cfg) for name, cfg in DOMAINS.items()}
_DEP_ATTR = {name: "index_" + name.replace("-", "_") for name in DOMAINS}
DOMAIN_ROUTES = ("search", "train", "images", "relevance")

http_app = FastAPI(title="image-similarity: read-only routes")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def client_errors(fn):
    """Answer :class:`ClientError` as ``{"error": message}`` with its 4xx status.

    BentoML's own handler wraps 4xx bodies in a list and double-encodes errors raised in
    dependencies, so client errors are turned into responses here, at the edge.
    """

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except ClientError as exc:
            ctx = kwargs["ctx"]
            ctx.response.status_code = exc.status
            return _error(exc.status, exc.message)

    return wrapper


def _site_images(archive: Path | None, images: list[Path], limits: Limits) -> Dataset:
    """read_site refuses more than ``limits.max_entries`` images in all (archive and files)."""
    data = _read_upload(archive, limits, "archive") if archive is not None else None
    files = [(_upload_name(p), _read_upload(p, limits, "images")) for p in images]
    return read_site(data, files, limits, IMAGE_SIZE)


def _upload_name(path: Path) -> str:
    """The client's file name: BentoML saves uploads as NamedTemporaryFile(suffix=<name>), i.e.
    'tmp' + 8 random characters + the name."""
    return re.sub(r"^tmp[a-z0-9_]{8}", "", path.name) or path.name


def _read_upload(path: Path, limits: Limits, field: str) -> bytes:
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise TooLarge(f"{field}: {size} bytes exceeds the limit of {limits.max_upload_bytes}")
    return path.read_bytes()


class ImageSimilarity:
    encoder = bentoml.depends(EncoderService)

    def __init__(self) -> None:
        self.repo = Repository(STORE)
        self.jobs = JobRecords(STORE)
        self.indexes = {name: getattr(self, attr) for name, attr in _DEP_ATTR.items()}
        self._training: set[str] = set()
        # Per domain, the encoder spec of the version its index service serves (a fine-tuned
        # version brings its own encoder); corrected whenever the index service says otherwise.
        self._serving_encoder: dict[str, str] = {}

    def _domain(self, ctx: bentoml.Context):
        name = ctx.request.path_params.get("domain", "")
        cfg = DOMAINS.get(name)
        if cfg is None:
            raise UnknownDomain(f"unknown domain {name!r}")
        return cfg

    async def _read_image(self, path: Path, limits: Limits, field: str):
        data = await anyio.to_thread.run_sync(_read_upload, path, limits, field)
        return await anyio.to_thread.run_sync(prepare, data, IMAGE_SIZE, limits.max_image_pixels, field)

    async def _encode_upload(self, path: Path, limits: Limits, encoder: str, field: str):
        pixels = await self._read_image(path, limits, field)
        vectors = await self.encoder.to_async.encode(images=pixels[None], encoder=encoder)
        return vectors[0]

    async def _with_served_encoder(self, cfg, encode_and_call) -> dict:
        """Run ``encode_and_call(spec)`` with the encoder of the version the index serves; if the
        version changed under us (the index service names another encoder), run it again."""
        spec = self._serving_encoder.get(cfg.name)
        if spec is None:
            spec = (await self.indexes[cfg.name].to_async.info())["serving_encoder"] or cfg.encoder
        for _ in range(3):
            found = await encode_and_call(spec)
            if found["version"] is None:
                raise Conflict(f"domain {cfg.name!r} has no index yet: train it first")
            if found.get("encoder", spec) == spec:
                self._serving_encoder[cfg.name] = spec
                return found
            spec = found["encoder"]
        raise Conflict(f"domain {cfg.name!r} is switching versions; try again")

    async def _search_vectors(self, cfg, pixels, top_k: int) -> dict:
        async def run(spec: str) -> dict:
            vector = (await self.encoder.to_async.encode(images=pixels[None], encoder=spec))[0]
            return await self.indexes[cfg.name].to_async.search(vector=vector, top_k=top_k, encoder=spec)

        return await self._with_served_encoder(cfg, run)

    @bentoml.api(route="/{domain}/search")
    @client_errors
    async def search(
        self,
        image: Path,
        top_k: Annotated[int | None, Field(ge=1, le=100, description="default: the domain's top_k")] = None,
        *,
        ctx: bentoml.Context,
    ) -> SearchResponse:
        """Most similar indexed images to the uploaded one, best first."""
        cfg = self._domain(ctx)
        pixels = await self._read_image(image, cfg.limits, "image")
        found = await self._search_vectors(cfg, pixels, top_k or cfg.top_k)
        if found.get("error"):
            raise Conflict(f"domain {cfg.name!r}: {found['error']}")
        return SearchResponse(domain=cfg.name, version=found["version"], results=found["results"])

    @bentoml.task(route="/{domain}/train")
    @client_errors
    async def train(
        self,
        archive: Path,
        mode: Annotated[
            Literal["auto", "finetune", "pretrained"] | None,
            Field(
                description="auto: fine-tune and promote only if better on the hold-out; finetune: "
                "always; pretrained: never. Default: the domain's training.mode"
            ),
        ] = None,
        *,
        ctx: bentoml.Context,
    ) -> TrainResponse:
        """Fine-tune, evaluate and index a zip of ``<category>/<image>`` (+ optional metadata.csv)
        as the domain's new version."""
        cfg = self._domain(ctx)
        task_id = getattr(ctx.request.state, "task_id", None)
        record = await anyio.to_thread.run_sync(self.jobs.started, task_id, cfg.name) if task_id else None
        try:
            result = await self._train(cfg, archive, mode)
        except ClientError as exc:
            if record:
                await anyio.to_thread.run_sync(self.jobs.failed, record, exc.status, exc.message)
            raise
        except Exception as exc:
            if record:
                await anyio.to_thread.run_sync(
                    self.jobs.failed, record, 500, f"internal error: {type(exc).__name__}"
                )
            raise
        if record:
            await anyio.to_thread.run_sync(self.jobs.completed, record, result.model_dump())
        return result

    async def _train(self, cfg, archive: Path, mode: str | None) -> TrainResponse:
        if cfg.name in self._training:
            raise Conflict(f"domain {cfg.name!r} is already training; try again when it finishes")
        self._training.add(cfg.name)
        try:
            data = await anyio.to_thread.run_sync(_read_upload, archive, cfg.limits, "archive")
            dataset = await anyio.to_thread.run_sync(read_zip, data, cfg.limits, IMAGE_SIZE)
            encoder_id = (await self.encoder.to_async.describe(encoder=cfg.encoder))["id"]
            backend = EncoderServiceBackend(self.encoder, cfg.encoder, encoder_id)
            report = await anyio.to_thread.run_sync(
                functools.partial(
                    train_domain,
                    self.repo,
                    cfg,
                    dataset,
                    backend,
                    mode=mode,
                    cache=FeatureCache(SETTINGS.store_cache_dir, encoder_id),
                    batch_size=SETTINGS.encode_batch_size,
                )
            )
            try:
                await self.indexes[cfg.name].to_async.reload()
            except Exception:  # published already; the index service's poller will pick it up
                logger.exception("domain %s: reload after publish failed", cfg.name)
            self._serving_encoder.pop(cfg.name, None)
            return TrainResponse(**report.as_json())
        finally:
            self._training.discard(cfg.name)

    @bentoml.api(route="/{domain}/relevance")
    @client_errors
    async def relevance(
        self,
        # Plain `Path` with a None default: BentoML 1.4 converts uploads only for fields annotated
        # exactly `Path` / `list[Path]` (an `Optional[Path]` upload fails validation).
        archive: Path = None,  # type: ignore[assignment]
        images: list[Path] = None,  # type: ignore[assignment]
        image_threshold: Annotated[
            float | None, Field(ge=-1, le=1, description="margin threshold; default: calibrated at training")
        ] = None,
        site_threshold: Annotated[
            float | None, Field(ge=0, le=1, description="default: the domain's relevance.site_threshold")
        ] = None,
        nearest: Annotated[int, Field(ge=0, le=20, description="neighbours listed per image")] = 3,
        *,
        ctx: bentoml.Context,
    ) -> RelevanceResponse:
        """Does this supplier site sell the domain's target product? Send the site's images as a zip
        (``archive``, any layout) and/or as files (``images``). Each image is encoded once and scored
        by its nearest indexed images: target label versus the best other label."""
        cfg = self._domain(ctx)
        if not cfg.target_label:
            raise ClientError(
                f"domain {cfg.name!r} names no target_label: relevance is for domains that do "
                f"({', '.join(n for n, c in DOMAINS.items() if c.target_label) or 'none configured'})"
            )
        if archive is None and not images:
            raise ClientError("send the site's images as a zip in 'archive' or as files in 'images'")
        dataset = await anyio.to_thread.run_sync(_site_images, archive, images or [], cfg.limits)
        rc = cfg.relevance
        batch = SETTINGS.encode_batch_size

        async def run(spec: str) -> dict:
            chunks = []
            for start in range(0, len(dataset.samples), batch):
                pixels = await anyio.to_thread.run_sync(decode_batch, dataset.samples[start : start + batch])
                chunks.append(await self.encoder.to_async.encode(images=pixels, encoder=spec))
            vectors = np.concatenate(chunks)
            return await self.indexes[cfg.name].to_async.neighbours(vectors=vectors, k=rc.k, encoder=spec)

        found = await self._with_served_encoder(cfg, run)
        if found.get("error"):
            raise Conflict(f"domain {cfg.name!r}: {found['error']}")
        verdict = judge_site(
            [s.name for s in dataset.samples],
            found["hits"],
            cfg.target_label,
            rc,
            calibration=found.get("relevance"),
            image_threshold=image_threshold,
            site_threshold=site_threshold,
            nearest=nearest,
        )
        return RelevanceResponse(
            domain=cfg.name,
            version=found["version"],
            **verdict,
            skipped=[{"name": s.name, "reason": s.reason} for s in dataset.skipped],
        )

    @bentoml.api(route="/similarity")
    @client_errors
    async def similarity(
        self,
        image_a: Path,
        image_b: Path,
        metric: Literal["cosine", "l1", "l2"] = "cosine",
        *,
        ctx: bentoml.Context,
    ) -> SimilarityResponse:
        """Distance and score between two images with the built-in encoder."""
        limits = Limits()
        a = await self._encode_upload(image_a, limits, BUILTIN, "image_a")
        b = await self._encode_upload(image_b, limits, BUILTIN, "image_b")
        d = metrics.pairwise_distance(metric, a, b)
        return SimilarityResponse(
            metric=metric, distance=d, score=float(metrics.distance_to_score(metric, d))
        )


# One dependency per domain index service; bentoml.service() collects them from the class.
for _name, _attr in _DEP_ATTR.items():
    setattr(ImageSimilarity, _attr, bentoml.depends(INDEX_SERVICES[_name]))

ImageSimilarity = bentoml.service(
    name="image-similarity",
    # One worker: the training lock and the per-domain dependency clients live in this process;
    # the heavy work (TF, FAISS) runs in the dependency processes anyway.
    workers=1,
    traffic={"timeout": 900},
)(ImageSimilarity)
ImageSimilarity = bentoml.asgi_app(http_app, path="/")(ImageSimilarity)
ImageSimilarity.add_asgi_middleware(
    GatewayMiddleware,
    domains=set(DOMAINS),
    domain_routes=DOMAIN_ROUTES,
    api_keys=api_keys(SETTINGS),
    search_requires_key=SETTINGS.search_requires_key,
    job_lookup=JobRecords(STORE).get,
    # Largest per-domain upload plus room for the multipart envelope and other form fields.
    max_body_bytes=max([c.limits.max_upload_bytes for c in DOMAINS.values()] + [Limits().max_upload_bytes])
    + 2**20,
)


@http_app.get("/domains", response_model=list[DomainInfo], summary="Domains and what they serve")
async def list_domains() -> list[DomainInfo]:
    svc = bentoml.get_current_service()
    out = []
    for name, cfg in DOMAINS.items():
        info = await svc.indexes[name].to_async.info()
        out.append(
            DomainInfo(
                name=name,
                description=cfg.description,
                encoder=cfg.encoder,
                metric=cfg.metric,
                top_k=cfg.top_k,
                **info,
            )
        )
    return out


@http_app.get("/stats", response_model=EncoderStats, summary="Encoder batching since start")
async def stats() -> EncoderStats:
    """How concurrent encodes were batched together (calls per model run), since the server started."""
    return EncoderStats(**await bentoml.get_current_service().encoder.to_async.stats())


@http_app.get(
    "/{domain}/images/{item_id}",
    summary="The stored image of a search result",
    responses={200: {"content": {"image/*": {}}}, 404: {"description": "unknown domain or id"}},
)
async def get_image(domain: str, item_id: int, version: str | None = None) -> Response:
    """Ids belong to a version: pass the search's ``version`` to be sure the id still means that image."""
    svc = bentoml.get_current_service()
    if domain not in DOMAINS:
        return _error(404, f"unknown domain {domain!r}")
    item = await svc.indexes[domain].to_async.item(item_id=item_id)
    if not item:
        return _error(404, f"domain {domain!r} has no item {item_id} in its current version")
    if version is not None and version != item["version"]:
        return _error(
            409, f"version {version} of {domain!r} is no longer served (now {item['version']}); search again"
        )
    try:
        data = await anyio.to_thread.run_sync(svc.repo.image, item["image_key"])
    except KeyError:
        return _error(404, f"image of item {item_id} is missing from the store")
    return Response(
        data,
        media_type=item["media_type"],
        headers={
            # Percent-encoded: names come from archives and may hold non-latin-1 or control characters.
            "X-Item-Name": quote(item["name"]),
            "X-Item-Label": quote(item["label"]),
            "X-Index-Version": item["version"],
        },
    )
