"""FAISS index kinds by size: build seconds, single-thread ms/query, recall@10 against exact search
and bytes/vector, on clustered synthetic vectors with held-out queries.

Queries are drawn like the data but not indexed: an indexed vector as its own query is an easy case
for a graph index and flatters recall.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np

from simserver.bench.common import clustered

logger = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "hnsw_fp16", "ivfpq")


def index_figures(
    n: int, d: int = 1280, queries: int = 300, kinds: Sequence[str] = KINDS, extrapolate: bool = True
) -> dict:
    """One entry per index kind built (``auto``: the kind the default policy picks at this ``n``);
    with ``extrapolate``, a rough guide to the same figures at 1M."""
    import faiss

    from simserver.index_choice import IndexPolicy, build_faiss, bytes_per_vector

    cpus = os.cpu_count() or 1
    faiss.omp_set_num_threads(cpus)
    x, _ = clustered(n + queries, d)
    x, q = x[:n], x[n:]
    _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)  # exact, without a copy of x
    out: dict = {"n": n, "dim": d, "queries": "held out"}
    for wanted in kinds:
        if wanted != "auto" and wanted in out:  # "auto" chose it already
            continue
        t0 = time.perf_counter()
        index, kind = build_faiss(x, "cosine", IndexPolicy(kind=wanted))
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)  # the per-query figure is single-thread, as the target says
        t0 = time.perf_counter()
        for row in q:
            index.search(row[None], 10)
        ms = (time.perf_counter() - t0) * 1000 / len(q)
        faiss.omp_set_num_threads(cpus)
        _, got = index.search(q, 10)
        recall = float(np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got, strict=True)]))
        per_vector = bytes_per_vector(index)
        out[kind] = {
            "build_s": round(build_s, 2),
            "ms_per_query_1_thread": round(ms, 3),
            "recall_at_10": round(recall, 4),
            "bytes_per_vector": round(per_vector, 1),
            "memory_gb": round(per_vector * n / 1e9, 2),
        }
        if extrapolate:
            # Builds grow ~linearly in N; queries linearly for Flat, ~log N for HNSW, ~sqrt N for
            # IVF (~sqrt N lists, a fixed nprobe of them scanned).
            scale = 1_000_000 / n
            growth = {"flat": scale, "hnsw": np.log(1e6) / np.log(n), "ivfpq": np.sqrt(scale)}
            out[kind]["extrapolated_1M"] = {
                "build_s": round(build_s * scale, 0),
                "ms_per_query_1_thread": round(ms * growth[kind.split("_")[0]], 2),
                "memory_gb": round(per_vector * 1e6 / 1e9, 2),
            }
        logger.info(
            "index %s at N=%d: build %.1f s, %.3f ms/query, recall@10 %.4f", kind, n, build_s, ms, recall
        )
        del index
    return out
