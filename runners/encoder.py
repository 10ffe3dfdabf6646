"""The shared encoder service: the only process that loads TensorFlow (~0.6 GB RSS each)."""

from __future__ import annotations

import logging
import threading

import bentoml
import numpy as np

from runners import RUNNER_CONNECTION
from simserver.domain_config import BUILTIN, load_domains
from simserver.encoder import Encoder
from simserver.settings import get_settings

logger = logging.getLogger(__name__)


@bentoml.service(
    name="encoder",
    workers=1,
    traffic={"timeout": 900},
    runner_connection=RUNNER_CONNECTION,
)
class EncoderService:
    # Declaring the model makes `bentoml build` carry it inside the Bento.
    builtin = bentoml.models.BentoModel(f"{get_settings().builtin_model}:latest")

    def __init__(self) -> None:
        self.settings = get_settings()
        self._encoders: dict[str, Encoder] = {}
        self._lock = threading.Lock()
        specs = {BUILTIN} | {c.encoder for c in load_domains(self.settings.domains_dir).values()}
        for spec in sorted(specs):
            self._get(spec)

    def _get(self, spec: str) -> Encoder:
        with self._lock:
            enc = self._encoders.get(spec)
            if enc is None:
                enc = Encoder(
                    spec,
                    builtin_model=self.settings.builtin_model,
                    batch_size=self.settings.encode_batch_size,
                    runtime=self.settings.encoder_runtime,
                    cache_dir=self.settings.store_cache_dir,
                )
                self._encoders[spec] = enc
            return enc

    @bentoml.api
    def encode(self, images: np.ndarray, encoder: str = BUILTIN) -> np.ndarray:
        """``uint8 [N, 224, 224, 3]`` -> ``float32 [N, D]`` unit vectors."""
        return self._get(encoder).encode(images)

    @bentoml.api
    def describe(self, encoder: str = BUILTIN) -> dict:
        enc = self._get(encoder)
        return {"id": enc.id, "dim": enc.dim, "image_size": enc.image_size, "runtime": enc.runtime}
