"""A served version of a domain's catalog: immutable segments plus tombstones.

A version is a list of **segments** (a base, built by a training or a compaction, with its FAISS
index; small deltas, each one upload's items) and **tombstones** (which rows of which segment are
deleted or replaced). Segments never change once written, so a new version costs one new delta
segment and one small tombstone blob, and a replica that loads it re-reads nothing it already holds
(segments are shared between the versions loaded in one process).

Search is the exact top-k among the live items that match the filter:

* a delta segment, a Flat base, or any segment where few rows match (``exact_scan_max``) is
  scanned exactly (``faiss.knn`` over the matching rows);
* an approximate base (HNSW, IVF-PQ) is searched with a FAISS ``IDSelectorBitmap`` of its live,
  matching rows (deleted items and filtered-out ones are never candidates), with extra candidates,
  which are then re-ranked by their exact distance (the stored float32 vectors);
* the segments' candidates are merged by distance.

Nothing here does I/O: :mod:`simserver.repository` loads and writes segments and versions.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import cached_property
from typing import Any

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simserver import metrics
from simserver.cpu import faiss_threads
from simserver.filters import Filter
from simserver.index import DomainIndex, Item
from simserver.index_choice import _exact_metric
from simserver.schemas import Hit

logger = logging.getLogger(__name__)
# FAISS's search-parameter classes take keyword arguments its type stubs do not describe.
_faiss: Any = faiss


class CatalogPolicy(BaseModel):
    """``catalog:`` in a domain's yaml: when deltas are compacted into a new base, and when a
    filtered search scans exactly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compact_max_deltas: int = Field(8, ge=1, description="compact when a version has more delta segments")
    compact_delta_fraction: float = Field(
        0.1, gt=0, le=10, description="compact when delta rows exceed this fraction of the base's rows"
    )
    compact_min_rows: int = Field(1000, ge=0, description="... and exceed this many rows")
    compact_dead_fraction: float = Field(
        0.2, gt=0, le=1, description="compact when this fraction of all rows is deleted or replaced"
    )
    exact_scan_max: int = Field(
        4096, ge=0, description="scan exactly when at most this many rows of an approximate base match"
    )
    candidates_factor: int = Field(4, ge=1, le=64, description="approximate base: k x this, then re-ranked")


class Segment:
    """Immutable rows: items, their float32 vectors (L2-normalised for cosine) and, for a base,
    the FAISS index built over them (None: scanned exactly)."""

    def __init__(
        self, sid: str, items: list[Item], vectors: np.ndarray, index: faiss.Index | None, kind: str
    ) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(items):
            raise ValueError(f"segment {sid}: {len(items)} items but vectors of shape {vectors.shape}")
        if index is not None and index.ntotal != len(items):
            raise ValueError(f"segment {sid}: index holds {index.ntotal} vectors but {len(items)} items")
        self.sid = sid
        self.items = items
        self.vectors = vectors
        self.index = index
        self.kind = kind
        self._columns: dict[str, np.ndarray] = {}
        self._numeric: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __reduce__(self):  # noqa: D105 - not picklable: a FAISS index and a cache
        raise TypeError("segments are not pickled")

    @cached_property
    def rows(self) -> dict[str, int]:
        """id -> row; later rows win (a segment never holds an id twice; kept simple anyway)."""
        return {it.id: r for r, it in enumerate(self.items)}

    def column(self, name: str) -> np.ndarray:
        col = self._columns.get(name)
        if col is None:
            values: list[str | None]
            if name == "label":
                values = [it.label for it in self.items]
            elif name == "id":
                values = [it.id for it in self.items]
            elif name == "name":
                values = [it.name for it in self.items]
            else:
                key = name.removeprefix("metadata.")
                values = [it.metadata.get(key) for it in self.items]
            col = np.empty(len(values), dtype=object)
            col[:] = values
            self._columns[name] = col
        return col

    @cached_property
    def label_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct labels, each row's index into them): a version's label counts in one bincount."""
        names, codes = np.unique(self.column("label").astype(str), return_inverse=True)
        return names, codes.astype(np.int64)

    def numeric(self, name: str) -> np.ndarray:
        num = self._numeric.get(name)
        if num is None:
            num = np.full(len(self.items), np.nan)
            for r, v in enumerate(self.column(name)):
                if v is None:
                    continue
                try:
                    num[r] = float(v)
                except (TypeError, ValueError):
                    pass
            self._numeric[name] = num
        return num

    def match(self, filt: Filter) -> np.ndarray:
        return filt.mask(self.column, self.numeric, len(self.items))


def _search_params(index: faiss.Index, sel: faiss.IDSelector | None, k: int, fraction: float) -> Any:
    """FAISS search parameters of ``index`` with selector ``sel``; wider search when few rows match."""
    widen = 1.0 / max(fraction, 1e-6)
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        ef = int(min(4096, max(hnsw.hnsw.efSearch, 2 * k, hnsw.hnsw.efSearch * min(widen, 8.0))))
        return _faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
    if isinstance(index, faiss.IndexRefine):
        base = faiss.downcast_index(index.base_index)
        ivf = faiss.extract_index_ivf(base)
        nprobe = int(min(ivf.nlist, ivf.nprobe * min(widen, 8.0)))
        return _faiss.IndexRefineSearchParameters(
            k_factor=index.k_factor, base_index_params=_faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        )
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return _faiss.SearchParameters(sel=sel)
    nprobe = int(min(ivf.nlist, ivf.nprobe * min(widen, 8.0)))
    return _faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)


def _hnsw_of(index: faiss.Index) -> Any:
    idx = faiss.downcast_index(index)
    return idx if hasattr(idx, "hnsw") else None


class Catalog:
    """One version: its manifest (``meta``), segments, and per segment the rows still live."""

    def __init__(
        self,
        meta: dict[str, Any],
        segments: list[Segment],
        alive: list[np.ndarray],
        policy: CatalogPolicy | None = None,
    ) -> None:
        if len(segments) != len(alive):
            raise ValueError("one alive mask per segment")
        self.meta = meta
        self.segments = segments
        self.alive = alive
        self.policy = policy or CatalogPolicy()
        dims = {s.vectors.shape[1] for s in segments if len(s)}
        if len(dims) > 1:
            raise ValueError(f"version {meta.get('version')}: segments of different dimensions {dims}")

    @classmethod
    def of(cls, index: DomainIndex, policy: CatalogPolicy | None = None) -> Catalog:
        """A one-segment catalog of a built index, in memory (tests, the CLI's local search)."""
        kind = index.meta.get("index_kind", "flat")
        seg = Segment(
            f"mem:{index.version}",
            index.items,
            index.vectors,
            None if kind == "flat" else index.faiss,
            "base",
        )
        return cls(
            {**index.meta, "segments": [{"id": seg.sid, "count": len(seg)}], "tombstones": []},
            [seg],
            [np.ones(len(seg), dtype=bool)],
            policy,
        )

    # -- what it is ----------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def encoder(self) -> str | None:
        """The encoder this version's vectors came from (None: the domain's configured one)."""
        return self.meta.get("encoder")

    @cached_property
    def count(self) -> int:
        return int(sum(int(a.sum()) for a in self.alive))

    def __len__(self) -> int:
        return self.count

    def labels(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for seg, alive in zip(self.segments, self.alive, strict=True):
            if len(seg):
                names, codes = seg.label_codes
                for name, c in zip(
                    names.tolist(), np.bincount(codes[alive], minlength=len(names)).tolist(), strict=True
                ):
                    if c:
                        counts[name] += c
        return dict(sorted(counts.items()))

    @property
    def items(self) -> list[Item]:
        """Every live item, in catalog order."""
        return list(self.iter_items())

    @property
    def dead_rows(self) -> int:
        return sum(len(a) - int(a.sum()) for a in self.alive)

    # -- items ---------------------------------------------------------------------------------
    def locate(self, item_id: str) -> tuple[int, int] | None:
        """(segment index, row) of the live item ``item_id``, or None."""
        for si in range(len(self.segments) - 1, -1, -1):
            row = self.segments[si].rows.get(item_id)
            if row is not None and self.alive[si][row]:
                return si, row
        return None

    def get(self, item_id: str) -> Item | None:
        where = self.locate(item_id)
        return None if where is None else self.segments[where[0]].items[where[1]]

    def vector(self, item_id: str) -> np.ndarray | None:
        where = self.locate(item_id)
        return None if where is None else self.segments[where[0]].vectors[where[1]]

    def matching(self, filt: Filter | None) -> list[np.ndarray]:
        """Per segment: live rows that match ``filt``."""
        if not filt:
            return self.alive
        return [
            a & seg.match(filt) if len(seg) else a for seg, a in zip(self.segments, self.alive, strict=True)
        ]

    def iter_items(self, filt: Filter | None = None):
        """Live items in catalog order (base first, then deltas, each in upload order)."""
        for seg, mask in zip(self.segments, self.matching(filt), strict=True):
            for r in np.flatnonzero(mask):
                yield seg.items[int(r)]

    def live(self) -> tuple[list[Item], np.ndarray]:
        """Every live item and its vector, in catalog order (a compaction's input)."""
        items: list[Item] = []
        chunks = []
        for seg, alive in zip(self.segments, self.alive, strict=True):
            rows = np.flatnonzero(alive)
            items += [seg.items[int(r)] for r in rows]
            chunks.append(seg.vectors[rows])
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
        return items, vectors

    # -- search --------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        top_k: int,
        filt: Filter | None = None,
        exclude: str | None = None,
    ) -> list[list[Hit]]:
        """Exact top-k live items matching ``filt`` for each query row, best first (``exclude``: an
        item id left out, the query item of "more like this")."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries have shape {q.shape}, index has dim {self.dim}")
        if self.metric == "cosine":
            q = metrics.l2_normalize(q)
        if top_k <= 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        masks = self.matching(filt)
        if exclude is not None and (where := self.locate(exclude)) is not None:
            masks = list(masks)
            masks[where[0]] = masks[where[0]].copy()
            masks[where[0]][where[1]] = False
        faiss_threads(len(q))
        dists: list[np.ndarray] = []
        owners: list[np.ndarray] = []  # (segment, row) pairs, packed as segment * 2**40 + row
        for si, (seg, mask) in enumerate(zip(self.segments, masks, strict=True)):
            c = int(mask.sum())
            if c == 0:
                continue
            d, rows = self._search_segment(seg, mask, c, q, top_k)
            dists.append(d)
            owners.append(np.where(rows >= 0, si * 2**40 + rows, -1))
        if not dists:
            return [[] for _ in range(len(q))]
        dist = np.concatenate(dists, axis=1)
        own = np.concatenate(owners, axis=1)
        dist = np.where(own >= 0, dist, np.inf)
        order = np.argsort(dist, axis=1, kind="stable")[:, :top_k]
        out: list[list[Hit]] = []
        for qi in range(len(q)):
            hits = []
            for j in order[qi]:
                packed = int(own[qi, j])
                if packed < 0 or not np.isfinite(dist[qi, j]):
                    continue
                seg = self.segments[packed >> 40]
                item = seg.items[packed & (2**40 - 1)]
                dj = float(dist[qi, j])
                hits.append(
                    Hit(
                        id=item.id,
                        name=item.name,
                        label=item.label,
                        score=float(metrics.distance_to_score(self.metric, dj)),
                        distance=dj,
                        metadata=dict(item.metadata),
                    )
                )
            out.append(hits)
        return out

    def _exact(self, q: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raw, ids = faiss.knn(q, vectors, k, metric=_exact_metric(self.metric))
        return metrics.faiss_to_distance(self.metric, raw), ids

    def _distances(self, q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Exact distances of one query to rows (the re-ranking of approximate candidates)."""
        x = vectors.astype(np.float64)
        qq = q.astype(np.float64)
        if self.metric in ("cosine", "ip"):
            d = 1.0 - x @ qq
            return np.maximum(d, 0.0) if self.metric == "cosine" else d
        if self.metric == "l2":
            return np.sqrt(np.maximum(((x - qq) ** 2).sum(axis=1), 0.0))
        return np.abs(x - qq).sum(axis=1)

    def _search_segment(
        self, seg: Segment, mask: np.ndarray, c: int, q: np.ndarray, top_k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distances and rows of ``seg``'s best ``min(top_k, c)`` rows in ``mask``, per query."""
        n = len(seg)
        k = min(top_k, c)
        approximate = seg.index is not None and seg.kind != "flat"
        if not approximate or c <= self.policy.exact_scan_max:
            if c == n:
                return self._exact(q, seg.vectors, k)
            rows = np.flatnonzero(mask)
            d, ids = self._exact(q, seg.vectors[rows], k)
            return d, np.where(ids >= 0, rows[np.maximum(ids, 0)], -1)
        assert seg.index is not None
        k2 = min(c, max(k * self.policy.candidates_factor, k + 16))
        bitmap = np.packbits(mask, bitorder="little")
        sel: faiss.IDSelector | None = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap)) if c < n else None
        params = _search_params(seg.index, sel, k2, c / n)
        _, cand = seg.index.search(q, k2, params=params)
        dist = np.full((len(q), k), np.inf)
        rows = np.full((len(q), k), -1, dtype=np.int64)
        for qi in range(len(q)):
            ids = cand[qi][cand[qi] >= 0]
            ids = ids[mask[ids]]  # the selector already did; cheap insurance
            if not len(ids):
                continue
            d = self._distances(q[qi], seg.vectors[ids])
            best = np.argsort(d, kind="stable")[:k]
            dist[qi, : len(best)] = d[best]
            rows[qi, : len(best)] = ids[best]
        return dist, rows
