"""What several benchmarks share: synthetic clustered vectors, the demo photos, a timing loop."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np

from simserver.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

DEMO = PROJECT_ROOT / "demo"
DEMO_DOMAINS = ("fashion", "food", "almonds-suppliers")


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (no such domain in the store, a server that did not start)."""


def bench_environment() -> None:
    """Defaults every benchmark wants before TensorFlow or BentoML load: the project's model store
    (where `simserver encoder build` puts the encoder) and a quiet TensorFlow."""
    os.environ.setdefault("BENTOML_HOME", str(PROJECT_ROOT / "var" / "bentoml"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def clustered(
    n: int, d: int = 1280, *, seed: int = 0, centres: int = 1000, chunk: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``centres`` random centres (noise 0.5 per coordinate), and each
    vector's centre. Real embeddings are clustered too, which is what makes approximate indices
    work, or not. Made in chunks: 1M x 1280 is 5 GB, and one expression would need three times that.

    The index benchmark and the HTTP benchmark's synthetic domain both use this one generator, so
    "N clustered synthetic 1280-d vectors" means the same set in both.
    """
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    which = np.empty(n, np.int64)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        ids = rng.integers(0, centres, m)
        part = middle[ids] + 0.5 * rng.standard_normal((m, d), np.float32)
        x[start : start + m] = part / np.linalg.norm(part, axis=1, keepdims=True)
        which[start : start + m] = ids
    return x, which


def demo_images(domain: str = "food", limit: int = 64) -> list[tuple[str, bytes]]:
    """Up to ``limit`` bundled demo photos of one domain as (name, bytes), in a fixed order."""
    root = DEMO / domain
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "metadata.csv"][:limit]
    if not files:
        raise FileNotFoundError(f"no demo images under {root}")
    return [(str(p.relative_to(root)), p.read_bytes()) for p in files]


def rate(call: Callable[[], object], items: int, seconds: float) -> tuple[float, list[float]]:
    """Items per second of ``call`` (each doing ``items``) over about ``seconds`` after one warm-up
    call, and every call's milliseconds (for medians: a mean hides the odd slow call)."""
    call()
    times: list[float] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
    return items * len(times) / (time.perf_counter() - t0), times
