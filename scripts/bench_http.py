"""Start the real server twice and measure startup, resident memory and search latency/errors.

    python scripts/bench_http.py [--requests 500 --concurrency 16]
    python scripts/bench_http.py --synthetic 100000      # a domain of 100k synthetic vectors

Uses the store in STORE_URI (build it first: `make demo`), or with --synthetic N a temporary store
holding one domain of N clustered synthetic 1280-d vectors (index chosen by the default policy)
queried with real images through the whole path (upload, decode, encoder, index): latency at 1, 4
and 16 clients (each with a keep-alive connection), and how the encoder batched concurrent calls
(``GET /stats``). Prints one JSON object.
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
import threading
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


def start(tmp: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    env = {
        "BENTOML_HOME": str(ROOT / "var" / "bentoml"),
        "STORE_URI": f"file://{ROOT}/var/store",
        **os.environ,
        "BENTOML_RESULT_STORE": str(tmp / f"tasks-{port}.db"),
        "PYTHONPATH": str(ROOT),
        **(extra_env or {}),
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


def _role(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    if "encoder" in cmd:
        return "encoder"
    if "index-" in cmd:
        return "index"
    if "ImageSimilarity" in cmd and "worker" in cmd:
        return "gateway"
    return "supervisor/other"


def _by_role(proc: subprocess.Popen, measure) -> dict[str, float]:
    root = psutil.Process(proc.pid)
    out: dict[str, float] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            role, value = _role(p), measure(p)
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + value
    return out


def rss_mb(proc: subprocess.Popen) -> dict[str, float]:
    out = _by_role(proc, lambda p: p.memory_info().rss / 2**20)
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def cpu_seconds(proc: subprocess.Popen | None) -> dict[str, float]:
    """CPU seconds (user + system) so far per server role, and of this client process."""
    out = _by_role(proc, lambda p: sum(p.cpu_times()[:2])) if proc else {}
    out["client"] = sum(psutil.Process().cpu_times()[:2])
    return out


def encoder_stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=30).json()


def wait_idle(url: str) -> None:
    """The encoder traces export templates in the background after start; measure after that."""
    deadline = time.monotonic() + 300
    while not encoder_stats(url)["export_templates_ready"] and time.monotonic() < deadline:
        time.sleep(0.5)


def batched(before: dict, after: dict) -> dict:
    """Calls per model run during one load phase (summed over base encoders)."""
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
    url: str, domain: str, images: list[bytes], n: int, concurrency: int, proc: subprocess.Popen | None = None
) -> dict:
    """n searches from ``concurrency`` clients, each with its own keep-alive connection; with the
    server's ``proc``, also the CPU milliseconds each process spent per request (where time goes)."""
    local = threading.local()

    def one(i: int) -> tuple[int, float]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        session = local.session
        t0 = time.perf_counter()
        try:
            r = session.post(
                f"{url}/{domain}/search", files={"image": ("q", images[i % len(images)])}, timeout=60
            )
            code = r.status_code
        except requests.RequestException:
            code = 0
        return code, (time.perf_counter() - t0) * 1000

    before = encoder_stats(url)
    cpu_before = cpu_seconds(proc)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    cpu = {k: (v - cpu_before.get(k, 0.0)) * 1000 / n for k, v in cpu_seconds(proc).items()}
    batching = batched(before, encoder_stats(url))
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
        "encoder_batching": batching,
        **({"cpu_ms_per_request": {k: round(v, 2) for k, v in cpu.items() if v >= 0.05}} if proc else {}),
    }


def synthetic_domain(tmp: Path, n: int) -> tuple[dict[str, str], dict]:
    """A store and domains folder with one domain ("synthetic") of n clustered 1280-d vectors."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from simserver.index import DomainIndex, Item
    from simserver.repository import Repository, new_version_id
    from simserver.store import LocalStore

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, 1280)).astype(np.float32)
    x = centres[rng.integers(0, 1000, n)] + 0.5 * rng.normal(size=(n, 1280)).astype(np.float32)
    items = [
        Item(f"c{i % 1000}/{i}.png", f"c{i % 1000}", f"domains/synthetic/images/{i}", "image/png")
        for i in range(n)
    ]
    t0 = time.perf_counter()
    index = DomainIndex.build(
        x,
        items,
        metric="cosine",
        encoder_id="synthetic",
        version=new_version_id(),
        extra_meta={"encoder": "builtin"},
    )
    build_s = time.perf_counter() - t0
    Repository(LocalStore(tmp / "store")).publish("synthetic", index)
    (tmp / "domains").mkdir()
    (tmp / "domains" / "synthetic.yaml").write_text("name: synthetic\ndescription: synthetic vectors\n")
    env = {"STORE_URI": f"file://{tmp / 'store'}", "DOMAINS_DIR": str(tmp / "domains")}
    info = {k: index.meta[k] for k in ("count", "index_kind", "recall_at_10", "bytes_per_vector")}
    return env, {**info, "build_s": round(build_s, 1)}


def query_images(domain: str = "fashion") -> list[bytes]:
    return [p.read_bytes() for p in sorted((ROOT / "demo" / domain).rglob("*"))[:64] if p.is_file()]


def search_figures(n: int, levels=((1, 200), (4, 400), (16, 500))) -> dict:
    """A server with one domain of n synthetic vectors; (clients, requests) per load level."""
    images = query_images()
    with tempfile.TemporaryDirectory() as tmp:
        env, info = synthetic_domain(Path(tmp), n)
        proc, url, startup = start(Path(tmp), env)
        try:
            wait_idle(url)
            load(url, "synthetic", images, 32, 4)  # warm-up
            runs = {f"{c}_clients": load(url, "synthetic", images, r, c, proc) for c, r in levels}
            rss = rss_mb(proc)
        finally:
            stop(proc)
    return {"domain": info, "startup_s": round(startup, 1), **runs, "rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--domain", default="fashion")
    ap.add_argument("--synthetic", type=int, default=0, help="serve one domain of N synthetic vectors")
    args = ap.parse_args()
    if args.synthetic:
        print(json.dumps(search_figures(args.synthetic), indent=2))
        return
    images = [p.read_bytes() for p in sorted((ROOT / "demo" / args.domain).rglob("*"))[:64] if p.is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, first = start(Path(tmp))
        stop(proc)
        proc, url, second = start(Path(tmp))
        try:
            wait_idle(url)
            load(url, args.domain, images, 32, 4)  # warm-up
            idle = rss_mb(proc)
            single = load(url, args.domain, images, 100, 1, proc)
            loaded = load(url, args.domain, images, args.requests, args.concurrency, proc)
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
