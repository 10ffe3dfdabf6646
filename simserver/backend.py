"""The training backend: where the model work of a training runs, in this process (CLI, scripts,
tests) or in the encoder service (server), and the progress callbacks a training reports to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from simserver.finetune import Head, TrainingConfig

Progress = Callable[[int], None]
# stage(name, total): a training entering a stage (simserver.progress.STAGES) of ``total`` images.
Stage = Callable[[str, int], None]


class Backend(Protocol):
    """Where the model work runs: in this process (CLI) or in the encoder service (server)."""

    encoder: str  # the domain's configured (pretrained) encoder
    encoder_id: str

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def train_head(self, features: np.ndarray, labels: list[str], config: TrainingConfig) -> Head: ...

    def export(self, head: Head, key: str, info: dict) -> str: ...
