"""Performance figures in one JSON object (the issue's benchmark).

    python scripts/bench.py --json            # full: ~15 minutes, includes a measured 1M-vector index
    python scripts/bench.py --json --quick    # < 2 minutes: smaller N, fewer requests, no 1M, no int8

* ``encoder_img_per_s``: the TF SavedModel and the TFLite/XNNPACK runtime at batch 1 and 32,
  measured alternately in one process so machine noise hits both.
* ``search``: a real ``bentoml serve`` with one domain of N synthetic 1280-d vectors (100k; 20k with
  --quick), queried with real images through the whole path (upload, decode, encoder, index) by 1, 4
  and 16 concurrent clients: ms p50/p95/p99, req/s, errors, and how the encoder batched the
  concurrent calls (``scripts/bench_http.py``).
* ``index``: build seconds, single-thread ms/query, recall@10 against exact search and bytes/vector
  for Flat, HNSW, HNSW over fp16 vectors and IVF-PQ on clustered synthetic vectors (real embeddings
  are clustered too) at N = 100k (20k with --quick), with a linear extrapolation to 1M.
* ``index_1M``: the same measured at 1,000,000 x 1280 for the index the default policy picks there
  (HNSW over fp16 vectors, 2.8 GB: float32 HNSW would need 5.4 GB, over the 4 GB budget) and for
  IVF-PQ, the fallback past the budget. Skipped with --quick.
* ``training``: training against encoding once, side by side (``scripts/bench_training.py``).
* ``quantization``: the int8 study (``scripts/bench_quantization.py``). Skipped with --quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import simserver  # noqa: E402,F401  (first: it sets FAISS's OpenMP wait policy before faiss loads)

os.environ.setdefault("BENTOML_HOME", str(ROOT / "var" / "bentoml"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def encoder_figures(seconds: float) -> dict:
    from simserver.encoder import Encoder

    runtimes = {
        "savedmodel": Encoder("builtin", runtime="savedmodel"),
        "tflite": Encoder("builtin", runtime="tflite"),
    }
    images = np.random.default_rng(0).integers(0, 256, (32, 224, 224, 3), dtype=np.uint8)
    out: dict[str, dict[str, float]] = {name: {} for name in runtimes}
    for batch in (1, 32):
        for name, enc in runtimes.items():  # alternate runtimes per batch size: same noise for both
            enc.encode(images[:batch])
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                enc.encode(images[:batch])
                n += batch
            out[name][f"batch_{batch}"] = round(n / (time.perf_counter() - t0), 1)
    return out


def clustered(n: int, d: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors around 1,000 centres, made in chunks (1M x 1280 is 5 GB; one expression
    would need three times that)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, d)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        part = centres[rng.integers(0, 1000, m)] + 0.5 * rng.standard_normal((m, d), np.float32)
        x[start : start + m] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def http_figures(n: int, quick: bool) -> dict:
    from bench_http import search_figures

    return search_figures(n, ((1, 40), (4, 80), (16, 120)) if quick else ((1, 300), (4, 600), (16, 800)))


def index_figures(
    n: int, d: int, queries: int, kinds=("flat", "hnsw", "hnsw_fp16", "ivfpq"), extrapolate=True
) -> dict:
    import faiss

    from simserver.index_choice import IndexPolicy, build_faiss, bytes_per_vector

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    # Queries are held out (drawn like the data, not indexed): an indexed vector as its own query
    # is an easy case for a graph and flatters recall.
    x = clustered(n + queries, d)
    x, q = x[:n], x[n:]
    _, truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)  # exact, without a copy of x
    out = {"n": n, "dim": d, "queries": "held out"}
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
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        _, got = index.search(q, 10)
        recall = float(np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got, strict=True)]))
        # A rough 1M guide: builds grow ~linearly in N; queries linearly for Flat, ~log N for HNSW,
        # ~sqrt N for IVF (~sqrt N lists, a fixed nprobe of them scanned).
        scale = 1_000_000 / n
        growth = {"flat": scale, "hnsw": np.log(1e6) / np.log(n), "ivfpq": np.sqrt(scale)}
        out[kind] = {
            "build_s": round(build_s, 2),
            "ms_per_query_1_thread": round(ms, 3),
            "recall_at_10": round(recall, 4),
            "bytes_per_vector": round(bytes_per_vector(index), 1),
            "memory_gb": round(bytes_per_vector(index) * n / 1e9, 2),
        }
        if extrapolate:
            out[kind]["extrapolated_1M"] = {
                "build_s": round(build_s * scale, 0),
                "ms_per_query_1_thread": round(ms * growth[kind.split("_")[0]], 2),
                "memory_gb": round(bytes_per_vector(index) * 1e6 / 1e9, 2),
            }
        del index
    return out


def training_figures(n: int, rounds: int) -> dict:
    from bench_training import training_figures as run

    return run(n, rounds)


def quantization_figures() -> dict:
    from bench_quantization import quantization_figures as run

    return run()


PARTS = ("encoder", "search", "index", "training", "quantization", "large")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object (the default output anyway)")
    ap.add_argument("--quick", action="store_true", help="N=20,000, 1.5 s per encoder figure, no 1M, no int8")
    ap.add_argument("-n", type=int, default=None, help="synthetic vectors for the index and search parts")
    ap.add_argument("--large", type=int, default=1_000_000, help="N of the measured large index (0: skip)")
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all; --quick skips quantization, large)",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if unknown := parts - set(PARTS):
        ap.error(f"unknown parts: {sorted(unknown)}")
    if args.quick:
        parts -= {"quantization", "large"}
    n = args.n or (20_000 if args.quick else 100_000)
    t0 = time.perf_counter()
    result: dict = {"machine": {"cpus": os.cpu_count()}}
    if "encoder" in parts:
        result["encoder_img_per_s"] = encoder_figures(1.5 if args.quick else 8.0)
    if "search" in parts:
        result["search"] = http_figures(n, args.quick)
    if "index" in parts:
        result["index"] = index_figures(n, 1280, 100 if args.quick else 300)
    if "training" in parts:
        result["training"] = training_figures(200 if args.quick else 1000, rounds=1)
    if "quantization" in parts:
        result["quantization"] = quantization_figures()
    if "large" in parts and args.large:
        result["index_1M" if args.large == 1_000_000 else f"index_{args.large}"] = index_figures(
            args.large, 1280, 200, kinds=("auto", "ivfpq"), extrapolate=False
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
