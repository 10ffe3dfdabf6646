"""Build a new domain version from encoded vectors: store images, index, publish.

Nothing is visible to searches until :meth:`Repository.publish` writes the pointer, which is the
last step; any failure before it leaves the previous version serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from simserver.index import DomainIndex, Item
from simserver.index_choice import IndexPolicy
from simserver.ingest import Dataset, Sample, iter_chunks
from simserver.repository import Repository, image_key, new_version_id, now_iso
from simserver.schemas import Skipped, TrainReply

logger = logging.getLogger(__name__)

EncodeFn = Callable[[np.ndarray], np.ndarray]
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class BuildReport:
    version: str
    indexed: int
    skipped: list[Skipped]
    labels: dict[str, int]
    seconds: float
    meta: dict = field(default_factory=dict)

    def reply(self) -> TrainReply:
        return TrainReply(
            version=self.version,
            indexed=self.indexed,
            skipped=self.skipped,
            labels=self.labels,
            seconds=round(self.seconds, 3),
            encoder=self.meta.get("encoder"),
            encoder_id=self.meta.get("encoder_id"),
            evaluation=self.meta.get("evaluation"),
            relevance=public_relevance(self.meta.get("relevance")),
            runtime=self.meta.get("runtime"),
            duplicates=self.meta.get("duplicates"),
        )

    def as_json(self) -> dict:
        return self.reply().model_dump(mode="json")


def public_relevance(calibration: dict | None) -> dict | None:
    """The relevance calibration as replies show it: the probe's size, not its weights (they stay
    in the version's meta.json, where the server reads them)."""
    if not calibration or not isinstance(calibration.get("probe"), dict):
        return calibration
    weights = calibration["probe"].get("weights") or []
    return {**calibration, "probe": {"features": len(weights)}}


def prefetched(batches: list[list[T]], load: Callable[[list[T]], R]) -> Iterator[tuple[list[T], R]]:
    """(batch, load(batch)) in order, loading the next batch on a helper thread while the caller
    works on this one: image decoding (Pillow releases the GIL) overlaps encoding."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(load, batches[0])
        for n, batch in enumerate(batches):
            loaded = pending.result()
            if n + 1 < len(batches):
                pending = pool.submit(load, batches[n + 1])
            yield batch, loaded


def decode_batch(samples: list[Sample]) -> np.ndarray:
    return np.stack([s.pixels for s in samples])


def encode_images(
    loaders: list[Callable[[], np.ndarray]],
    encode: EncodeFn,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """One vector per pixel loader, in order; batches are decoded one ahead of encoding."""
    batches = list(iter_chunks(loaders, batch_size))
    out: list[np.ndarray] = []
    for batch, pixels in prefetched(batches, lambda b: np.stack([load() for load in b])):
        out.extend(np.asarray(encode(pixels), dtype=np.float32))
        if progress:
            progress(len(batch))
    return out


def publish_version(
    repo: Repository,
    domain: str,
    dataset: Dataset,
    vectors: np.ndarray,
    *,
    encoder_id: str,
    encoder: str,
    metric: str,
    policy: IndexPolicy | None = None,
    version: str | None = None,
    previous: str | None = None,
    extra_meta: dict | None = None,
    started: float | None = None,
    stage: Callable[[str, int], None] | None = None,
) -> BuildReport:
    """Store the images, build the index of ``vectors`` and point ``domain`` at it (last)."""
    t0 = started if started is not None else time.perf_counter()
    created = now_iso()
    items = []
    for s in dataset.samples:
        key = s.image_key or image_key(domain, s.data, s.media_type)
        if not s.image_key:  # else already stored (by a distributed build's actors)
            repo.put_image(key, s.data)
        items.append(Item(s.name, s.label, key, s.media_type, s.metadata, s.id, created))
    index = DomainIndex.build(
        vectors,
        items,
        metric=metric,
        encoder_id=encoder_id,
        version=version or new_version_id(),
        extra_meta={"skipped": len(dataset.skipped), "encoder": encoder, **(extra_meta or {})},
        policy=policy,
    )
    if stage:
        stage("publishing", 0)
    repo.publish(domain, index, expected_previous=previous)
    return BuildReport(
        index.version, len(items), dataset.skipped, dataset.labels(), time.perf_counter() - t0, index.meta
    )
