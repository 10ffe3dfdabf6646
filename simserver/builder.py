"""Build a new domain version from a dataset: encode, index, store images, publish.

Nothing is visible to searches until :meth:`Repository.publish` writes the pointer, which is the
last step; any failure before it leaves the previous version serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simserver.index import DomainIndex, Item
from simserver.index_choice import IndexPolicy
from simserver.ingest import Dataset, Skipped, iter_chunks
from simserver.repository import Repository, image_key, new_version_id

logger = logging.getLogger(__name__)

EncodeFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class BuildReport:
    version: str
    indexed: int
    skipped: list[Skipped]
    labels: dict[str, int]
    seconds: float
    meta: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "version": self.version,
            "indexed": self.indexed,
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "labels": self.labels,
            "seconds": round(self.seconds, 3),
        }


def encode_dataset(
    dataset: Dataset, encode: EncodeFn, batch_size: int = 32, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    chunks = []
    for chunk in iter_chunks(dataset.samples, batch_size):
        chunks.append(np.asarray(encode(np.stack([s.pixels for s in chunk])), dtype=np.float32))
        if progress:
            progress(len(chunk))
    return np.concatenate(chunks)


def build_domain(
    repo: Repository,
    domain: str,
    dataset: Dataset,
    *,
    encode: EncodeFn,
    encoder_id: str,
    metric: str,
    policy: IndexPolicy | None = None,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    started: float | None = None,
) -> BuildReport:
    t0 = started if started is not None else time.perf_counter()
    previous = repo.current_version(domain)
    vectors = encode_dataset(dataset, encode, batch_size, progress)
    items = []
    for s in dataset.samples:
        key = image_key(domain, s.data, s.media_type)
        repo.put_image(key, s.data)
        items.append(Item(s.name, s.label, key, s.media_type, s.metadata))
    index = DomainIndex.build(
        vectors,
        items,
        metric=metric,
        encoder_id=encoder_id,
        version=new_version_id(),
        extra_meta={"skipped": len(dataset.skipped)},
        policy=policy,
    )
    repo.publish(domain, index, expected_previous=previous)
    return BuildReport(
        index.version, len(items), dataset.skipped, dataset.labels(), time.perf_counter() - t0, index.meta
    )
