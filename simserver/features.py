"""Backbone features of a training's images, once per image: cached by content hash on local disk
(:class:`FeatureCache`), decoded one batch ahead of encoding; and of their seeded augmented views."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from simserver.augment import view as augmented_view
from simserver.backend import Backend, Progress
from simserver.builder import encode_images
from simserver.ingest import Sample
from simserver.store import LocalStore


class FeatureCache:
    """Backbone features by image content hash, on local disk. A cache, so no fsync
    (``LocalStore(durable=False)``): a torn or lost file fails to parse and is recomputed."""

    def __init__(self, root: Path, encoder_id: str) -> None:
        digest = hashlib.sha256(encoder_id.encode()).hexdigest()[:16]
        self.root = Path(root)
        self.store = LocalStore(Path(root) / "features" / digest, durable=False)

    def sibling(self, encoder_id: str) -> FeatureCache:
        """The cache of another encoder's features (its int8 runtime's) under the same root."""
        return FeatureCache(self.root, encoder_id)

    @staticmethod
    def _key(key: str) -> str:
        return f"{key[:2]}/{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            vector = np.load(io.BytesIO(self.store.get(self._key(key))), allow_pickle=False)
        except Exception:  # missing, empty, torn or not an array: recompute
            return None
        return vector if vector.ndim == 1 and vector.dtype == np.float32 else None

    def put(self, key: str, vector: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(vector, dtype=np.float32), allow_pickle=False)
        self.store.put(self._key(key), buf.getvalue())


def _encode_jobs(
    jobs: list[tuple[str, Callable[[], np.ndarray]]],
    backend: Backend,
    cache: FeatureCache | None,
    batch_size: int,
    progress: Progress | None,
) -> np.ndarray:
    """Features for (cache key, pixel loader) jobs. Cached ones are not decoded; the rest are
    decoded on a helper thread one batch ahead, so decoding overlaps encoding."""
    out: list[np.ndarray | None] = [cache.get(k) if cache else None for k, _ in jobs]
    todo = [i for i, v in enumerate(out) if v is None]
    if progress and len(todo) < len(jobs):
        progress(len(jobs) - len(todo))
    vectors = encode_images([jobs[i][1] for i in todo], backend.encode, batch_size, progress)
    for i, v in zip(todo, vectors, strict=True):
        out[i] = v
        if cache:
            cache.put(jobs[i][0], v)
    if not jobs:
        return np.zeros((0, 0), np.float32)
    return np.stack(out)  # type: ignore[arg-type]


def _pixels(sample: Sample) -> np.ndarray:
    return sample.pixels


def content_hash(sample: Sample) -> str:
    return hashlib.sha256(sample.data).hexdigest()


def backbone_features(
    samples: list[Sample],
    backend: Backend,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> np.ndarray:
    return _encode_jobs(
        [(content_hash(s), partial(_pixels, s)) for s in samples], backend, cache, batch_size, progress
    )


def view_features(
    samples: list[Sample],
    n_views: int,
    seed: int,
    backend: Backend,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Features of ``n_views`` augmented views per sample, and the sample each row came from."""
    jobs: list[tuple[str, Callable[[], np.ndarray]]] = []
    owner: list[int] = []
    for i, s in enumerate(samples):
        h = content_hash(s)
        for v in range(n_views):

            def load(s: Sample = s, h: str = h, v: int = v) -> np.ndarray:
                return augmented_view(s.pixels, h, v, seed)

            jobs.append((f"{h}-aug{v}-s{seed}", load))
            owner.append(i)
    return _encode_jobs(jobs, backend, cache, batch_size, progress), owner
