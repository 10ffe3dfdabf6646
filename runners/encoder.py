"""The shared encoder service: the only process that may load TensorFlow (~1 GB RSS with it), and
only for a training's export: serving runs every encoder on TFLite, self-checked against the
SavedModels' stored vectors (:mod:`simserver.encoder`, :mod:`simserver.text_encoder`).

It encodes for every domain (pretrained and fine-tuned encoders, by name: see
:mod:`simserver.encoder_pool`) and does the model part of a training for the trainer service: the
head fit (NumPy) and the export of backbone + head as a SavedModel (TensorFlow).
"""

from __future__ import annotations

import logging
import os
import threading

import bentoml
import numpy as np

from runners import INTERNAL_SERVICE, RUNNER_CONNECTION, die_with_server
from simserver import request_ids
from simserver.domain_config import BUILTIN, load_domains
from simserver.encoder_pool import EncoderPool
from simserver.finetune import Head, TrainingConfig, train_head
from simserver.schemas import EncoderInfo, EncoderStats
from simserver.settings import get_settings
from simserver.store import open_store
from simserver.text_encoder import TEXT_MODEL, TextEncoderPool

logger = logging.getLogger(__name__)


@bentoml.service(
    name="encoder",
    workers=1,
    # Sync APIs run in a pool of this many threads (BentoML's default is 1, which would serialize
    # every call): concurrent encodes must reach the batcher together to be batched.
    threads=16,
    traffic={"timeout": 900},
    runner_connection=RUNNER_CONNECTION,
    **INTERNAL_SERVICE,
)
class EncoderService:
    # Declaring the model makes `bentoml build` carry it inside the Bento.
    builtin = bentoml.models.BentoModel(f"{get_settings().builtin_model}:latest")
    # The built-in text encoder (domains with text: configured), carried inside the Bento the same way.
    builtin_text = bentoml.models.BentoModel(f"{TEXT_MODEL}:latest")

    def __init__(self) -> None:
        die_with_server()
        request_ids.install_log_filter()  # the gateway's request ids, as baggage
        settings = get_settings()
        self.pool = EncoderPool.from_settings(
            settings, store=open_store(settings.store_uri, settings.store_cache_dir)
        )
        domains = load_domains(settings.domains_dir).values()
        for encoder in sorted({BUILTIN} | {c.encoder for c in domains}):
            self.pool.get(encoder)
        self.text_pool = TextEncoderPool(settings.encoder_runtime)
        for text_encoder in sorted({c.text.encoder for c in domains if c.text is not None}):
            self.text_pool.get(text_encoder)
        # The fine-tuned-encoder export templates (seconds of tracing each) are traced in the
        # background when a training starts (prepare_exports), not here: traced at start-up, they
        # held the GIL for ~20 s after /readyz, and the first searches took 2-4x the warm p50.
        self._wanted = sorted(
            {
                (c.encoder, c.training.output_dim(self.pool.get(c.encoder).dim))
                for c in domains
                if c.training.mode != "pretrained"
            }
        )
        self._templates_ready = threading.Event()  # set: no template being traced now
        self._templates_ready.set()
        self._templates_started = False
        self._templates_lock = threading.Lock()

    @bentoml.api
    def prepare_exports(self) -> bool:
        """Start tracing the export templates in the background, once; a training calls it when it
        starts, minutes before its export needs them. True if this call started it."""
        with self._templates_lock:
            if self._templates_started:
                return False
            self._templates_started = True
            self._templates_ready.clear()
        threading.Thread(
            target=self._prepare, args=(self._wanted,), name="export-templates", daemon=True
        ).start()
        return True

    def _prepare(self, wanted: list[tuple[str, int]]) -> None:
        # Lowest CPU priority for this thread only (Linux niceness is per thread): searches served
        # meanwhile must not wait behind the tracing (measured: it took a third of the CPU).
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        try:
            self._prepare_templates(wanted)
        finally:
            self._templates_ready.set()

    def _prepare_templates(self, wanted: list[tuple[str, int]]) -> None:
        for encoder, dim in wanted:
            try:
                self.pool.prepare_export(encoder, dim)
            except Exception:  # only a head start: the export traces it again if needed
                logger.exception("cannot prepare the export template for %s", encoder)

    @bentoml.api
    def encode(self, images: np.ndarray, encoder: str = BUILTIN) -> np.ndarray:
        """``uint8 [N, 224, 224, 3]`` -> ``float32 [N, D]`` unit vectors."""
        return self.pool.get(encoder).encode(images)

    @bentoml.api
    def encode_text(self, texts: list[str], encoder: str = BUILTIN) -> np.ndarray:
        """Texts -> ``float32 [N, D]`` unit vectors with a text encoder (``text.encoder``)."""
        return self.text_pool.get(encoder).encode(texts)

    @bentoml.api
    def describe(self, encoder: str = BUILTIN) -> EncoderInfo:
        """Loads the encoder if needed (the trainer warms a fine-tuned one before publishing it)."""
        enc = self.pool.get(encoder)
        return EncoderInfo(id=enc.id, dim=enc.dim, image_size=enc.image_size, runtime=enc.runtime)

    @bentoml.api
    def stats(self) -> EncoderStats:
        """Adaptive batching so far, per loaded base encoder (fine-tuned ones share their backbone's),
        and whether the background export templates are done."""
        return EncoderStats.model_validate(
            {"batching": self.pool.batch_stats(), "export_templates_ready": self._templates_ready.is_set()}
        )

    @bentoml.api
    def train_head(self, features: np.ndarray, labels: list[str], config: dict) -> np.ndarray:
        """Fit a head on backbone features; returns it packed (see ``Head.pack``)."""
        return train_head(features, labels, TrainingConfig.model_validate(config)).pack()

    @bentoml.api
    def export(self, encoder: str, head: np.ndarray, key: str, info: dict) -> str:
        """Save ``encoder`` + head as one SavedModel at ``key`` in the store; returns the new
        encoder (``store:<key>``)."""
        return self.pool.export(encoder, Head.unpack(head), key, info)


EncoderService.add_asgi_middleware(request_ids.BaggageIdMiddleware)  # type: ignore[attr-defined]  # a Service
