"""Several benchmarks side by side on the same machine, in one JSON object (the issue's benchmark).

* ``encoder``: :mod:`simserver.bench.encoder` (SavedModel, raw and served float32 TFLite, served
  int8; batch 1 and 32; the bundled domains' runtime decisions);
* ``search``: :mod:`simserver.bench.http` on a domain of N synthetic vectors, with its ratios;
* ``index``: :mod:`simserver.bench.index` at N, with a linear extrapolation to 1M;
* ``training``: :mod:`simserver.bench.training`;
* ``quantization``: :mod:`simserver.bench.quantization`;
* ``large``: the index measured at 1,000,000 x 1280 for the kind the default policy picks there
  (HNSW over fp16 vectors, 2.8 GB: float32 HNSW would need 5.4 GB, over the 4 GB budget) and for
  IVF-PQ, the fallback past the budget.

``quick``: N = 20k, 1.5 s per encoder figure, fewer requests, no quantization, no large index.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from simserver.bench.common import bench_environment

logger = logging.getLogger(__name__)

PARTS = ("encoder", "search", "index", "training", "quantization", "large")
QUICK_SKIPS = {"quantization", "large"}


def run_suite(
    parts: Iterable[str] = PARTS, *, quick: bool = False, n: int | None = None, large: int = 1_000_000
) -> dict:
    wanted = set(parts)
    if unknown := wanted - set(PARTS):
        raise ValueError(f"unknown parts: {sorted(unknown)} (known: {', '.join(PARTS)})")
    if quick:
        wanted -= QUICK_SKIPS
    bench_environment()
    n = n or (20_000 if quick else 100_000)
    t0 = time.perf_counter()
    result: dict = {"machine": {"cpus": os.cpu_count()}, "quick": quick}
    # Imports per part: each pulls in what it needs (TensorFlow, FAISS, a server) only when run.
    if "encoder" in wanted:
        from simserver.bench.encoder import encoder_figures

        result["encoder_img_per_s"] = encoder_figures(1.5 if quick else 8.0)
    if "search" in wanted:
        from simserver.bench.http import LEVELS, QUICK_LEVELS, http_figures

        result["search"] = http_figures(
            synthetic=n, levels=QUICK_LEVELS if quick else LEVELS, encoder_seconds=2.0 if quick else 8.0
        )
    if "index" in wanted:
        from simserver.bench.index import index_figures

        result["index"] = index_figures(n, 1280, 100 if quick else 300)
    if "training" in wanted:
        from simserver.bench.training import training_figures

        result["training"] = training_figures(200 if quick else 1000, rounds=1)
    if "quantization" in wanted:
        from simserver.bench.quantization import quantization_figures

        result["quantization"] = quantization_figures()
    if "large" in wanted and large:
        from simserver.bench.index import index_figures

        key = "index_1M" if large == 1_000_000 else f"index_{large}"
        result[key] = index_figures(large, 1280, 200, kinds=("auto", "ivfpq"), extrapolate=False)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
