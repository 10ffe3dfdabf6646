"""The one place where vectors are normalised and distances become scores.

Every metric reports a ``distance`` (0 = identical, larger = less alike) and a ``score`` in [0, 1]
(1 = identical), so clients can threshold without knowing which metric a domain uses.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Metric = Literal["cosine", "l2", "l1", "ip"]
METRICS: tuple[str, ...] = ("cosine", "l2", "l1", "ip")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def faiss_to_distance(metric: str, raw: np.ndarray) -> np.ndarray:
    """FAISS returns similarities for inner-product indices and squared L2 for L2 ones."""
    raw = np.asarray(raw, dtype=np.float64)
    if metric == "cosine":
        return np.maximum(1.0 - raw, 0.0)  # float error gives -1e-7 for identical vectors
    if metric == "ip":
        return 1.0 - raw
    if metric == "l2":
        return np.sqrt(np.maximum(raw, 0.0))
    if metric == "l1":
        return raw
    raise ValueError(f"unknown metric {metric!r}")


def distance_to_score(metric: str, distance: np.ndarray | float) -> np.ndarray:
    d = np.asarray(distance, dtype=np.float64)
    if metric in ("cosine", "ip"):
        # cosine distance 1 - cos: cos in [-1, 1]; anti-correlated vectors are as "unlike" as it gets.
        return np.clip(1.0 - d, 0.0, 1.0)
    if metric in ("l2", "l1"):
        return 1.0 / (1.0 + np.maximum(d, 0.0))
    raise ValueError(f"unknown metric {metric!r}")


def pairwise_distance(metric: str, a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if metric == "cosine":
        a, b = l2_normalize(a).astype(np.float64), l2_normalize(b).astype(np.float64)
        return float(1.0 - np.dot(a, b))
    if metric == "ip":
        return float(1.0 - np.dot(a, b))
    if metric == "l2":
        return float(np.linalg.norm(a - b))
    if metric == "l1":
        return float(np.abs(a - b).sum())
    raise ValueError(f"unknown metric {metric!r}")
