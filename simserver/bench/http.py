"""Search over HTTP against a real ``bentoml serve``, next to the encoder's own speed in the same run.

The server answers real demo photos (``demo/food``) through the whole path (upload, decode, encoder,
index) at 1, 4 and 16 concurrent clients, each with its own keep-alive connection, either on a
domain of the store (``make demo`` builds them) or on a domain of N clustered synthetic 1280-d
vectors (index kind chosen by the default policy). Per load level: latency percentiles, req/s,
errors, how the encoder batched concurrent calls (``GET /stats``) and the CPU milliseconds each
server process (and the client) spent per search (psutil).

The acceptance ratios compare the server with the encoder alone, measured in this process with the
server's own construction (``EncoderPool.from_settings``: same runtime, same threads) while the
server is idle, and released before the HTTP load, so the two never compete for the cores:

* per-search overhead = search p50 at 1 client - the encoder's p50 for one image (target <= 6 ms);
* req/s at 4 clients / the encoder's batch-1 img/s (target >= 0.7), and at 16 clients (>= 0.8).
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from simserver.bench.common import BenchError, bench_environment, clustered, demo_images, rate
from simserver.bench.server import Server
from simserver.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

# (clients, requests) per load level.
LEVELS: tuple[tuple[int, int], ...] = ((1, 300), (4, 600), (16, 800))
QUICK_LEVELS: tuple[tuple[int, int], ...] = ((1, 40), (4, 80), (16, 120))
QUERY_DOMAIN = "food"  # the demo photos sent as queries
SYNTHETIC = "synthetic"

# name -> (what, comparison, target)
TARGETS = {
    "search_overhead_ms": ("search p50 at 1 client - encoder p50 for one image", "<=", 6.0),
    "throughput_4_clients": ("req/s at 4 clients / encoder batch-1 img/s", ">=", 0.7),
    "throughput_16_clients": ("req/s at 16 clients / encoder batch-1 img/s", ">=", 0.8),
}


def synthetic_domain(scratch: Path, n: int) -> tuple[dict[str, str], dict]:
    """A store and a domains folder with one domain ("synthetic") of n clustered 1280-d vectors;
    returns the server environment that points at them, and what the build chose."""
    from simserver.index import DomainIndex, Item
    from simserver.repository import Repository, new_version_id
    from simserver.store import LocalStore

    x, centre = clustered(n, 1280)
    # Labelled by centre; the images are never fetched, so the keys need not exist.
    items = [
        Item(f"c{c}/{i}.png", f"c{c}", f"domains/{SYNTHETIC}/images/{i}", "image/png")
        for i, c in enumerate(centre.tolist())
    ]
    t0 = time.perf_counter()
    index = DomainIndex.build(
        x,
        items,
        metric="cosine",
        encoder_id="synthetic",
        version=new_version_id(),
        extra_meta={"encoder": "builtin"},  # queries are encoded by the built-in encoder
    )
    build_s = time.perf_counter() - t0
    Repository(LocalStore(scratch / "store")).publish(SYNTHETIC, index)
    domains = scratch / "domains"
    domains.mkdir()
    (domains / f"{SYNTHETIC}.yaml").write_text(f"name: {SYNTHETIC}\ndescription: synthetic vectors\n")
    env = {"STORE_URI": f"file://{scratch / 'store'}", "DOMAINS_DIR": str(domains)}
    info = {k: index.meta[k] for k in ("count", "index_kind", "recall_at_10", "bytes_per_vector")}
    return env, {"name": SYNTHETIC, **info, "build_s": round(build_s, 1)}


def encoder_alone(images: list[tuple[str, bytes]], seconds: float) -> dict:
    """The served encoder's batch-1 speed on the query photos, in this process; released after."""
    bench_environment()
    from simserver.preprocess import prepare

    pixels = np.stack([prepare(data, 224, 10**8, name) for name, data in images])
    out = _time_encoder(pixels, seconds)
    # The pool and its interpreters (and their threads) went with _time_encoder's frame: collect them
    # before the HTTP load. TensorFlow's own memory stays in this process, but nothing of it runs.
    gc.collect()
    return out


def _time_encoder(pixels: np.ndarray, seconds: float) -> dict:
    from simserver.encoder_pool import EncoderPool
    from simserver.settings import get_settings

    pool = EncoderPool.from_settings(get_settings())  # what the encoder service builds: runtime, threads
    encoder = pool.get("builtin")
    turn = iter(range(10**12))

    def one() -> None:
        i = next(turn) % len(pixels)  # cycle through the photos, as the searches will
        encoder.encode(pixels[i : i + 1])

    speed, ms = rate(one, 1, seconds)
    return {
        "runtime": encoder.runtime,
        "threads": getattr(encoder, "threads", None),
        "img_per_s_batch_1": round(speed, 1),
        "ms_per_image_p50": round(statistics.median(ms), 2),
        "calls": len(ms),
    }


def batched(before: dict, after: dict) -> dict:
    """Calls per model run during one load phase (summed over base encoders), from ``GET /stats``."""
    hist: dict[str, int] = {}
    calls = runs = 0
    for spec, a in after["batching"].items():
        b = before["batching"].get(spec, {"runs": 0, "calls": 0, "calls_per_run": {}})
        calls += a["calls"] - b["calls"]
        runs += a["runs"] - b["runs"]
        for k, v in a["calls_per_run"].items():
            if v - b["calls_per_run"].get(k, 0):
                hist[k] = hist.get(k, 0) + v - b["calls_per_run"].get(k, 0)
    return {
        "mean_calls_per_run": round(calls / runs, 2) if runs else None,
        "calls_per_run": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
    }


def load(
    server: Server, domain: str, images: list[tuple[str, bytes]], n: int, clients: int, warm_up: bool = False
) -> dict:
    """``n`` searches from ``clients`` threads, each with its own keep-alive connection."""
    local = threading.local()

    def one(i: int) -> tuple[int, float]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        name, data = images[i % len(images)]
        t0 = time.perf_counter()
        try:
            r = local.session.post(f"{server.url}/{domain}/search", files={"image": (name, data)}, timeout=60)
            code = r.status_code
        except requests.RequestException:
            code = 0
        return code, (time.perf_counter() - t0) * 1000

    before = server.stats()
    cpu_before = server.cpu_seconds()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    cpu = {k: (v - cpu_before.get(k, 0.0)) * 1000 / n for k, v in server.cpu_seconds().items()}
    ms = sorted(m for _, m in res)
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else [ms[0]] * 99
    out = {
        "requests": n,
        "clients": clients,
        "errors": sum(c != 200 for c, _ in res),
        "p50_ms": round(q[49], 1),
        "p95_ms": round(q[94], 1),
        "p99_ms": round(q[98], 1),
        "rps": round(n / wall, 1),
        "encoder_batching": batched(before, server.stats()),
        "cpu_ms_per_request": {k: round(v, 2) for k, v in cpu.items() if v >= 0.05},
    }
    logger.info(
        "%d clients: p50 %.1f ms, %.1f req/s, %d errors", clients, out["p50_ms"], out["rps"], out["errors"]
    )
    return out


def ratios(encoder: dict, runs: dict[int, dict]) -> dict:
    """The acceptance ratios (None where a load level was not run), each with its target."""
    values: dict[str, float | None] = {
        "search_overhead_ms": (
            round(runs[1]["p50_ms"] - encoder["ms_per_image_p50"], 2) if 1 in runs else None
        ),
        "throughput_4_clients": (
            round(runs[4]["rps"] / encoder["img_per_s_batch_1"], 3) if 4 in runs else None
        ),
        "throughput_16_clients": (
            round(runs[16]["rps"] / encoder["img_per_s_batch_1"], 3) if 16 in runs else None
        ),
    }
    out = {}
    for name, (what, op, target) in TARGETS.items():
        v = values[name]
        met = None if v is None else (v <= target if op == "<=" else v >= target)
        out[name] = {"value": v, "target": f"{op} {target:g}", "met": met, "what": what}
    return out


def http_figures(
    *,
    synthetic: int = 0,
    domain: str = QUERY_DOMAIN,
    levels: Sequence[tuple[int, int]] = LEVELS,
    encoder_seconds: float = 8.0,
    starts: int = 1,
    source: Path | None = None,
) -> dict:
    """Everything in one run; ``synthetic``: serve one domain of that many synthetic vectors instead
    of ``domain`` from the store; ``starts``: start the server that many times (startup figures);
    ``source``: a checkout whose service.py and runners/ to serve (default: this one)."""
    bench_environment()
    images = demo_images(QUERY_DOMAIN)
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        scratch = Path(tmp)
        env: dict[str, str] = {}
        info: dict = {"name": domain}
        if synthetic:
            env, info = synthetic_domain(scratch, synthetic)
            domain = SYNTHETIC
        startups = []
        for _ in range(starts - 1):  # earlier starts only time the startup
            with Server(scratch, env, source) as server:
                startups.append(round(server.startup_s, 1))
        with Server(scratch, env, source) as server:
            startups.append(round(server.startup_s, 1))
            served = {d["name"]: d for d in requests.get(f"{server.url}/domains", timeout=30).json()}
            if not (served.get(domain) or {}).get("version"):
                raise BenchError(f"domain {domain!r} has no version in this store: build it (make demo)")
            info.setdefault("count", served[domain].get("count"))
            server.wait_idle()
            idle = server.rss_mb()
            encoder = encoder_alone(images, encoder_seconds)
            load(server, domain, images, 32, 4, warm_up=True)  # connections, first-call paths
            runs = {clients: load(server, domain, images, n, clients) for clients, n in levels}
            busy = server.rss_mb()
            if not server.stats()["batching"] and encoder["runtime"] == "tflite":
                logger.warning("the server reports no TFLite batching: it may run another runtime")
            sigterm_s = server.stop()
    return {
        "source": str(source or PROJECT_ROOT),
        "domain": info,
        "queries": {"domain": QUERY_DOMAIN, "images": len(images)},
        "startup_s": startups,
        "encoder_alone": encoder,
        **{f"{clients}_clients": r for clients, r in runs.items()},
        "ratios": ratios(encoder, runs),
        "rss_mb_idle": idle,
        "rss_mb_after_load": busy,
        "sigterm_exit_s": round(sigterm_s, 1),
    }
