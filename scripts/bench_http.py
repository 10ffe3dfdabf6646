"""Start the real server twice and measure startup, resident memory and search latency/errors.

    python scripts/bench_http.py [--requests 500 --concurrency 16] [--json]

Uses the store in STORE_URI (build it first: `make demo`). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = {
        "BENTOML_HOME": str(ROOT / "var" / "bentoml"),
        "STORE_URI": f"file://{ROOT}/var/store",
        **os.environ,
        "BENTOML_RESULT_STORE": str(tmp / f"tasks-{port}.db"),
        "PYTHONPATH": str(ROOT),
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service:ImageSimilarity",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout-graceful-shutdown",
            "10",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit("server exited during startup")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready in 300 s")


def stop(proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)
    return time.monotonic() - t0


def rss_mb(proc: subprocess.Popen) -> dict[str, float]:
    root = psutil.Process(proc.pid)
    out: dict[str, float] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
            rss = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
        name = (
            "encoder"
            if "encoder" in cmd
            else "index"
            if "index-" in cmd
            else "gateway"
            if "ImageSimilarity" in cmd and "worker" in cmd
            else "supervisor/other"
        )
        out[name] = out.get(name, 0.0) + rss
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def load(url: str, domain: str, images: list[bytes], n: int, concurrency: int) -> dict:
    def one(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        try:
            r = requests.post(
                f"{url}/{domain}/search", files={"image": ("q", images[i % len(images)])}, timeout=60
            )
            code = r.status_code
        except requests.RequestException:
            code = 0
        return code, (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    ms = sorted(m for _, m in res)
    q = statistics.quantiles(ms, n=100)
    return {
        "requests": n,
        "concurrency": concurrency,
        "errors": sum(c != 200 for c, _ in res),
        "p50_ms": round(q[49], 1),
        "p95_ms": round(q[94], 1),
        "p99_ms": round(q[98], 1),
        "rps": round(n / wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--domain", default="fashion")
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted((ROOT / "demo" / args.domain).rglob("*"))[:64] if p.is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, first = start(Path(tmp))
        stop(proc)
        proc, url, second = start(Path(tmp))
        try:
            load(url, args.domain, images, 32, 4)  # warm-up
            idle = rss_mb(proc)
            single = load(url, args.domain, images, 100, 1)
            loaded = load(url, args.domain, images, args.requests, args.concurrency)
            busy = rss_mb(proc)
        finally:
            shutdown = stop(proc)
    print(
        json.dumps(
            {
                "startup_s": {"first": round(first, 1), "second": round(second, 1)},
                "rss_mb_idle": idle,
                "rss_mb_after_load": busy,
                "search_1_client": single,
                f"search_{args.concurrency}_clients": loaded,
                "sigterm_exit_s": round(shutdown, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
