"""A domain index: FAISS vectors plus, per id, the item's name, label, metadata and stored image.

An index is saved as a self-describing folder: ``index.faiss``, ``items.json`` (id -> name, label,
metadata, image key) and ``meta.json`` (dim, metric, encoder id, count, labels, created_at, version).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import faiss
import numpy as np

from simserver import metrics
from simserver.cpu import faiss_threads
from simserver.index_choice import IndexPolicy, build_faiss, bytes_per_vector, recall_at_10
from simserver.schemas import Hit

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One catalog item. ``id`` is stable across versions (``metadata.csv``'s ``id`` column, else
    the archive path ``<label>/<file>``); FAISS row numbers are internal."""

    name: str
    label: str
    image_key: str
    media_type: str
    metadata: dict[str, str] = field(default_factory=dict)
    id: str = ""
    created_at: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class DomainIndex:
    """A FAISS index built over items: a training's base segment (see :mod:`simserver.catalog`)."""

    def __init__(
        self, index: faiss.Index, items: list[Item], meta: dict[str, Any], vectors: np.ndarray | None = None
    ) -> None:
        if index.ntotal != len(items):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(items)} items")
        self.faiss = index
        self.items = items
        self.meta = meta
        self._vectors = vectors

    @property
    def vectors(self) -> np.ndarray:
        """The indexed float32 vectors (L2-normalised for cosine); reconstructed from the FAISS
        index for an index read from files (exact for Flat and HNSW, approximate otherwise)."""
        if self._vectors is None:
            n, d = self.faiss.ntotal, self.faiss.d
            try:
                self._vectors = self.faiss.reconstruct_n(0, n) if n else np.zeros((0, d), np.float32)
            except RuntimeError:
                ivf = faiss.extract_index_ivf(self.faiss)
                ivf.make_direct_map()
                self._vectors = self.faiss.reconstruct_n(0, n)
        return self._vectors

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        items: list[Item],
        *,
        metric: str,
        encoder_id: str,
        version: str,
        extra_meta: dict[str, Any] | None = None,
        policy: IndexPolicy | None = None,
    ) -> DomainIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise ValueError(f"vectors {vectors.shape} do not match {len(items)} items")
        if metric == "cosine":
            vectors = metrics.l2_normalize(vectors)
        policy = policy or IndexPolicy()
        index, kind = build_faiss(vectors, metric, policy)
        # Exact search has recall 1 by definition; approximate builds are measured every time.
        recall = 1.0 if kind == "flat" else recall_at_10(index, vectors, metric, policy.recall_sample)
        meta = {
            "format": FORMAT_VERSION,
            "version": version,
            "dim": int(vectors.shape[1]),
            "metric": metric,
            "encoder_id": encoder_id,
            "count": len(items),
            "labels": dict(sorted(Counter(i.label for i in items).items())),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "faiss_index": type(index).__name__,
            "index_kind": kind,
            "recall_at_10": round(recall, 4),
            "bytes_per_vector": round(bytes_per_vector(index), 1),
            **(extra_meta or {}),
        }
        return cls(index, items, meta, vectors)

    @property
    def encoder(self) -> str | None:
        """The encoder this version's vectors came from (None: the domain's configured one)."""
        return self.meta.get("encoder")

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        """Nearest items of each query row, best first (one FAISS call for the batch)."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries have shape {q.shape}, index has dim {self.dim}")
        if self.metric == "cosine":
            q = metrics.l2_normalize(q)
        k = min(top_k, len(self.items))
        if k <= 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        faiss_threads(len(q))
        raw, ids = self.faiss.search(q, k)
        out = []
        for row_raw, row_ids in zip(raw, ids, strict=True):
            dist = metrics.faiss_to_distance(self.metric, row_raw)
            score = metrics.distance_to_score(self.metric, dist)
            hits = []
            for i, d, s in zip(row_ids, dist, score, strict=True):
                if i < 0:
                    continue
                item = self.items[int(i)]
                hits.append(
                    Hit(
                        id=item.id,
                        name=item.name,
                        label=item.label,
                        score=float(s),
                        distance=float(d),
                        metadata=dict(item.metadata),
                    )
                )
            out.append(hits)
        return out

    # -- (de)serialisation: bytes so the same code works for any artifact store ------------------
    def to_files(self) -> dict[str, bytes]:
        return {
            "index.faiss": faiss.serialize_index(self.faiss).tobytes(),
            "items.json": json.dumps([asdict(i) for i in self.items]).encode(),
            "meta.json": json.dumps(self.meta, indent=2, sort_keys=True).encode(),
        }

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> DomainIndex:
        index = faiss.deserialize_index(np.frombuffer(files["index.faiss"], dtype=np.uint8))
        items = [Item(**d) for d in json.loads(files["items.json"])]
        meta = json.loads(files["meta.json"])
        return cls(index, items, meta)

    FILES = ("index.faiss", "items.json", "meta.json")
