"""The trainer service: owns every training (one worker, one training per domain at a time).

read -> features -> split -> fit -> evaluate -> calibrate -> publish (:mod:`simserver.training`),
with the model parts (backbone features, head fit, export) run by the encoder service. The
gateway validates the upload and submits; no FAISS build runs in the gateway process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
import bentoml
import numpy as np

from runners import INTERNAL_SERVICE, RUNNER_CONNECTION, die_with_server, exit_after_sigterm
from runners.encoder import EncoderService
from simserver import request_ids
from simserver.domain_config import DomainConfig, load_domains
from simserver.encoder import IMAGE_SIZE
from simserver.errors import Conflict, RequestRefused, UnknownDomain
from simserver.features import FeatureCache
from simserver.finetune import Head, TrainingConfig, TrainingMode
from simserver.ingest import read_zip
from simserver.progress import tracker_for, zip_entries
from simserver.repository import Repository
from simserver.schemas import TrainReply
from simserver.settings import get_settings
from simserver.store import LocalStore, open_store
from simserver.sweep import sweep
from simserver.training import merge_catalog, train_domain

logger = logging.getLogger(__name__)
T = TypeVar("T")


def once_more_if_reset(call: Callable[[], T]) -> T:
    """``call()``, and once more if its connection was reset: the encoder's server closes a
    keep-alive connection idle for 5 s, and a call that picks it up at that moment gets a reset
    (seen when a training starts ~5 s after the previous one). Idempotent calls only."""
    import aiohttp

    try:
        return call()
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
        logger.info("encoder call: %r on a reused connection; once more", exc)
        return call()


class EncoderServiceBackend:
    """The training backend (``simserver.backend.Backend``) of the trainer: the model work
    runs in the encoder service, through its dependency client (sync calls from a worker thread
    of the trainer's event loop)."""

    def __init__(self, client, encoder: str, encoder_id: str) -> None:
        self.client = client
        self.encoder = encoder
        self.encoder_id = encoder_id

    def encode(self, images: np.ndarray) -> np.ndarray:
        return once_more_if_reset(lambda: self.client.encode(images=images, encoder=self.encoder))

    def encode_with(self, images: np.ndarray, encoder: str) -> np.ndarray:
        """Another encoder's vectors (the int8 runtime's, :mod:`simserver.runtime_choice`)."""
        return once_more_if_reset(lambda: self.client.encode(images=images, encoder=encoder))

    def encode_text(self, texts: list[str], encoder: str) -> np.ndarray:
        """Text vectors (domains with ``text:``: the fusion weights a training learns)."""
        return once_more_if_reset(lambda: self.client.encode_text(texts=texts, encoder=encoder))

    def train_head(self, features: np.ndarray, labels: list[str], config: TrainingConfig) -> Head:
        packed = self.client.train_head(features=features, labels=labels, config=config.model_dump())
        return Head.unpack(packed)

    def export(self, head: Head, key: str, info: dict) -> str:
        encoder = self.client.export(encoder=self.encoder, head=head.pack(), key=key, info=info)
        # Load (and self-check) it in the encoder service before the version goes live, so the
        # first search on the new version does not wait for it.
        self.client.describe(encoder=encoder)
        return encoder


@bentoml.service(
    name="trainer",
    workers=1,
    # The gateway's training task waits on this call: a large set may train for hours, and
    # BentoML would cancel the call at this timeout (a background task itself has none).
    traffic={"timeout": 24 * 3600},
    runner_connection=RUNNER_CONNECTION,
    **INTERNAL_SERVICE,
)
class TrainerService:
    encoder = bentoml.depends(EncoderService)

    def __init__(self) -> None:
        die_with_server()
        request_ids.install_log_filter()  # the gateway's request ids, as baggage
        exit_after_sigterm()
        self.settings = get_settings()
        self.domains: dict[str, DomainConfig] = load_domains(self.settings.domains_dir)
        store = open_store(self.settings.store_uri, self.settings.store_cache_dir)
        self.repo = Repository(store)
        # The only writer of versions: what a killed training left behind goes before it trains.
        sweep(store.root if isinstance(store, LocalStore) else None, self.settings.store_cache_dir)
        self._training: set[str] = set()
        self._lock = threading.Lock()

    def _claim(self, domain: str) -> DomainConfig:
        cfg = self.domains.get(domain)
        if cfg is None:
            raise UnknownDomain(f"unknown domain {domain!r}")
        with self._lock:
            if domain in self._training:
                raise Conflict(f"domain {domain!r} is already training; try again when it finishes")
            self._training.add(domain)
        return cfg

    @bentoml.api
    async def train(
        self,
        domain: str,
        archive: bytes,
        mode: TrainingMode | None = None,
        catalog: str | None = None,
        task_id: str | None = None,
    ) -> TrainReply:
        """Fine-tune, evaluate, calibrate and publish a zip of ``<category>/<image>`` as the
        domain's new version; the previous one serves until the pointer moves."""
        # The pipeline is sync code whose encoder calls go back through this event loop; in a
        # worker thread that is abandoned on cancel, a shutdown mid-training is not deadlocked by
        # it. An abandoned training may still publish (the pointer is written last, so a version
        # is whole or absent) before the process exits.
        return await anyio.to_thread.run_sync(
            self._train, domain, archive, mode, catalog, task_id, abandon_on_cancel=True
        )

    def _train(
        self,
        domain: str,
        archive: bytes,
        mode: TrainingMode | None,
        catalog: str | None = None,
        task_id: str | None = None,
    ) -> TrainReply:
        cfg = self._claim(domain)
        # GET /{domain}/train/progress reads it from the store, on any replica.
        tracker = tracker_for(self.repo.store, task_id)
        advance, stage = (tracker.advance, tracker.stage) if tracker else (None, None)
        try:
            self.encoder.prepare_exports()  # traced while this training reads and encodes
            if stage:
                stage("reading", zip_entries(archive))
            dataset = read_zip(archive, cfg.limits, IMAGE_SIZE, progress=advance)
            if catalog == "merge":
                dataset = merge_catalog(self.repo, cfg, dataset, IMAGE_SIZE)
            elif catalog not in (None, "replace"):
                raise RequestRefused(f"catalog: {catalog!r} is not one of replace, merge")
            encoder_id = once_more_if_reset(lambda: self.encoder.describe(encoder=cfg.encoder)).id
            report = train_domain(
                self.repo,
                cfg,
                dataset,
                EncoderServiceBackend(self.encoder, cfg.encoder, encoder_id),
                mode=mode,
                cache=FeatureCache(self.settings.store_cache_dir, encoder_id),
                batch_size=self.settings.encode_batch_size,
                progress=advance,
                stage=stage,
            )
            return report.reply()
        finally:
            with self._lock:
                self._training.discard(domain)


TrainerService.add_asgi_middleware(request_ids.BaggageIdMiddleware)  # type: ignore[attr-defined]  # a Service
