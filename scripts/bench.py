"""Performance figures in one JSON object: encoder runtimes side by side, and index kinds by size.

    python scripts/bench.py --json            # N = 100,000 synthetic 1280-d vectors
    python scripts/bench.py --json --quick    # N = 20,000, shorter timings (< 2 minutes)

Encoder: img/s of the TF SavedModel and the TFLite/XNNPACK runtime at batch 1 and 32, measured
alternately in one process so machine noise hits both. Index: build seconds, single-thread ms/query,
recall@10 against exact search and bytes/vector for Flat, HNSW and IVF-PQ on clustered synthetic
vectors (real embeddings are clustered too), with a linear extrapolation to 1M vectors. HTTP search
latency is `scripts/bench_http.py`. Training: `scripts/bench_training.py` (training vs encoding
once, side by side) at N = 1000 (300 with --quick). Not yet here: a 100k-item domain over HTTP.
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


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, d)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_figures(n: int, d: int, queries: int) -> dict:
    import faiss

    from simserver.index_choice import IndexPolicy, build_faiss, bytes_per_vector, recall_at_10

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    x = clustered(n, d)
    q = x[np.random.default_rng(1).choice(n, queries, replace=False)]
    out = {"n": n, "dim": d}
    for kind in ("flat", "hnsw", "ivfpq"):
        t0 = time.perf_counter()
        index, _ = build_faiss(x, "cosine", IndexPolicy(kind=kind))
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)  # the per-query figure is single-thread, as the target says
        t0 = time.perf_counter()
        for row in q:
            index.search(row[None], 10)
        ms = (time.perf_counter() - t0) * 1000 / len(q)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        recall = 1.0 if kind == "flat" else recall_at_10(index, x, "cosine", queries)
        # Flat search and HNSW/IVF builds grow ~linearly in N (HNSW queries ~log N): a rough 1M guide.
        scale = 1_000_000 / n
        out[kind] = {
            "build_s": round(build_s, 2),
            "ms_per_query_1_thread": round(ms, 3),
            "recall_at_10": round(recall, 4),
            "bytes_per_vector": round(bytes_per_vector(index), 1),
            "extrapolated_1M": {
                "build_s": round(build_s * scale, 0),
                "ms_per_query_1_thread": round(
                    ms * (scale if kind != "hnsw" else np.log(1e6) / np.log(n)), 2
                ),
                "memory_gb": round(bytes_per_vector(index) * 1e6 / 1e9, 2),
            },
        }
        del index
    return out


def training_figures(n: int, rounds: int) -> dict:
    from bench_training import training_figures as run

    return run(n, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object (the default output anyway)")
    ap.add_argument("--quick", action="store_true", help="N=20,000 and 3 s per encoder figure")
    ap.add_argument("-n", type=int, default=None, help="synthetic vectors for the index part")
    args = ap.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    t0 = time.perf_counter()
    result = {
        "machine": {"cpus": os.cpu_count()},
        "encoder_img_per_s": encoder_figures(3.0 if args.quick else 8.0),
        "index": index_figures(n, 1280, 100 if args.quick else 300),
        "training": training_figures(300 if args.quick else 1000, rounds=1),
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
