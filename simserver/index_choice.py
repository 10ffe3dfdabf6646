"""Which FAISS index a build gets, by size and memory budget, and how good it is.

Exact ``Flat`` search up to ``flat_max`` vectors (it is exact, and at that size fast enough); above
it HNSW when its graph fits the memory budget (best recall per millisecond), then HNSW over float16
vectors (half the memory, same recall: 0.999 at 100k), else IVF-PQ (compressed, a few dozen bytes per
vector). PQ codes alone rank poorly (recall@10 ~0.57 on 1280-d embeddings), so
when it fits the budget IVF-PQ re-ranks ``refine_k_factor`` x k candidates with 8-bit scalar-quantised
vectors (1 byte per dimension, a quarter of the raw vectors). Every approximate build is measured:
recall@10 against exact search on a sample of the indexed vectors, stored in ``meta.json`` with the
bytes each vector costs.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simserver.cpu import faiss_threads
from simserver.metrics import METRICS

logger = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "hnsw", "hnsw_fp16", "ivfpq"]


class IndexPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: IndexKind = "auto"
    # Flat costs ~0.44 ms per 1,000 1280-d vectors per query on one core: 4.4 ms at 10k (HNSW: ~1 ms).
    flat_max: int = Field(10_000, ge=1, description="auto: exact search up to this many vectors")
    memory_budget_bytes: int = Field(4 * 2**30, ge=1, description="auto: HNSW only if it fits")
    hnsw_m: int = Field(32, ge=4, le=128)
    hnsw_ef_search: int = Field(96, ge=8, le=4096)
    ivf_nprobe: int = Field(32, ge=1)
    ivfpq_refine: Literal["auto", "sq8", "none"] = Field(
        "auto", description="re-rank IVF-PQ candidates with 8-bit vectors (auto: if within the budget)"
    )
    # Measured at 1M x 1280 (held-out queries, nprobe 32): 8 -> recall@10 0.22 at 1.3 ms, 32 -> 0.59,
    # 64 -> 0.84 at 1.9 ms, 128 -> 0.95 at 2.4 ms. Re-ranking is cheap next to the PQ scan.
    refine_k_factor: int = Field(64, ge=1, le=512, description="candidates re-ranked per result")
    recall_sample: int = Field(200, ge=10, description="queries used to measure recall@10")


def _faiss_metric(metric: str) -> int:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (one of {', '.join(METRICS)})")
    return faiss.METRIC_INNER_PRODUCT if metric in ("cosine", "ip") else faiss.METRIC_L2


def _exact_metric(metric: str) -> int:
    """The metric for exact (Flat) search, which alone supports L1."""
    return faiss.METRIC_L1 if metric == "l1" else _faiss_metric(metric)


def _hnsw_bytes(n: int, d: int, m: int, bytes_per_dim: int = 4) -> int:
    return n * (bytes_per_dim * d + 2 * m * 4 + 16)


def _refine_bytes(n: int, d: int, pq_bytes: int) -> int:
    return n * (d + pq_bytes + 8)


def choose_kind(n: int, d: int, metric: str, policy: IndexPolicy) -> str:
    if metric == "l1":  # FAISS's approximate indices do not support L1: they would rank by L2
        if policy.kind not in ("auto", "flat"):
            logger.warning("index kind %s cannot search L1; building exact Flat instead", policy.kind)
        return "flat"
    if policy.kind != "auto":
        return policy.kind
    if n <= policy.flat_max:
        return "flat"
    if _hnsw_bytes(n, d, policy.hnsw_m) <= policy.memory_budget_bytes:
        return "hnsw"
    if _hnsw_bytes(n, d, policy.hnsw_m, 2) <= policy.memory_budget_bytes:
        return "hnsw_fp16"  # at 1M x 1280: 2.8 GB where float32 needs 5.4
    return "ivfpq"


def build_faiss(vectors: np.ndarray, metric: str, policy: IndexPolicy) -> tuple[faiss.Index, str]:
    n, d = vectors.shape
    fm = _faiss_metric(metric)
    kind = choose_kind(n, d, metric, policy)
    faiss_threads(n)  # this thread may have searched single-threaded before
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlat(d, _exact_metric(metric))
    elif kind in ("hnsw", "hnsw_fp16"):
        hnsw: faiss.IndexHNSW
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, policy.hnsw_m, fm)
        else:
            # The stubs say a ScalarQuantizer; the C++ constructor (and this call) takes its QuantizerType.
            hnsw = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, policy.hnsw_m, fm)  # type: ignore[arg-type]
        hnsw.hnsw.efConstruction = 80
        hnsw.hnsw.efSearch = policy.hnsw_ef_search
        index = hnsw
    elif kind == "ivfpq":
        # ~sqrt(N) lists: at 1M, 1,000 lists of ~1,000 vectors, nprobe of them scanned per query.
        # FAISS wants >= 39 training points per list and per PQ centroid (256 of them); k-means runs
        # on a sample of that size (at 1M x 1280, k-means on every vector would take ~15 minutes).
        nlist = max(1, min(int(math.sqrt(n)), n // 39))
        size = min(n, max(64 * nlist, 39 * 256))
        sample = vectors[np.random.default_rng(0).choice(n, size=size, replace=False)]
        m = next(m for m in (64, 32, 16, 8, 4, 2, 1) if d % m == 0 and m <= d)
        quantizer = faiss.IndexFlat(d, fm)
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, fm)
        ivf.nprobe = min(policy.ivf_nprobe, nlist)
        refine = policy.ivfpq_refine == "sq8" or (
            policy.ivfpq_refine == "auto" and _refine_bytes(n, d, m) <= policy.memory_budget_bytes
        )
        if refine:
            refined = faiss.IndexRefine(ivf, faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, fm))
            refined.k_factor = policy.refine_k_factor  # faiss's wrapper keeps both parts alive
            index = refined
        else:
            index = ivf
        index.train(sample)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(vectors)
    return index, kind


def recall_at_10(index: faiss.Index, vectors: np.ndarray, metric: str, sample: int, seed: int = 0) -> float:
    """Fraction of the exact top-10 neighbours the index returns, over ``sample`` indexed vectors,
    each leaving itself out: a query's own vector is the easiest hit and would flatter the figure.
    (Held-out queries, as ``simserver bench index`` uses, are harsher still for compressed indices.)"""
    n = len(vectors)
    k = min(10, n - 1)
    if k <= 0:
        return 1.0
    rng = np.random.default_rng(seed)
    ids = rng.choice(n, size=min(sample, n), replace=False)
    queries = vectors[ids]
    faiss_threads(len(queries))
    # faiss.knn scans the caller's array in place (an IndexFlat would copy it: 5 GB at 1M x 1280).
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    _, truth = faiss.knn(queries, vectors, k + 1, metric=_exact_metric(metric))
    _, got = index.search(queries, k + 1)
    hits = 0
    for own, t, g in zip(ids, truth, got, strict=True):
        t = [i for i in t if i != own][:k]
        g = [i for i in g if i != own and i >= 0][:k]
        hits += len(set(t) & set(g))
    return hits / (len(queries) * k)


def bytes_per_vector(index: faiss.Index) -> float:
    return len(faiss.serialize_index(index)) / max(1, index.ntotal)
