"""Encoder speed: the TF SavedModel (the source of truth) and the TFLite/XNNPACK runtime (what
serves), at batch 1 and 32, measured alternately in one process so machine noise hits both."""

from __future__ import annotations

import logging
from functools import partial

import numpy as np

from simserver.bench.common import bench_environment, rate

logger = logging.getLogger(__name__)


def random_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    # Content does not change a CNN's speed; random pixels avoid reading files in the timed loop.
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def encoder_figures(seconds: float = 8.0) -> dict[str, dict[str, float]]:
    """img/s per runtime and batch size: ``{"savedmodel": {"batch_1": …, "batch_32": …}, "tflite": …}``."""
    bench_environment()
    from simserver.encoder import Encoder

    runtimes = {
        "savedmodel": Encoder("builtin", runtime="savedmodel"),
        "tflite": Encoder("builtin", runtime="tflite"),
    }
    images = random_images(32)
    out: dict[str, dict[str, float]] = {name: {} for name in runtimes}
    for batch in (1, 32):
        for name, enc in runtimes.items():  # alternate runtimes per batch size: same noise for both
            speed, _ = rate(partial(enc.encode, images[:batch]), batch, seconds)
            out[name][f"batch_{batch}"] = round(speed, 1)
            logger.info("encoder %s batch %d: %.1f img/s", name, batch, speed)
    return out
