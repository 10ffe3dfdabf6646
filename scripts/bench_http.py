"""Start the real server twice and measure startup, resident memory and search latency/errors.

    python scripts/bench_http.py [--requests 500 --concurrency 16]
    python scripts/bench_http.py --synthetic 100000      # a domain of 100k synthetic vectors

Uses the store in STORE_URI (build it first: `make demo`), or with --synthetic N a temporary store
holding one domain of N clustered synthetic 1280-d vectors (index chosen by the default policy)
queried with real images through the whole path (upload, decode, encoder, index): latency at 1, 4
and 16 clients. Prints one JSON object.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--domain", default="fashion")
    ap.add_argument("--synthetic", type=int, default=0, help="serve one domain of N synthetic vectors")
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted((ROOT / "demo" / "fashion").rglob("*"))[:64] if p.is_file()]
    if args.synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            env, info = synthetic_domain(Path(tmp), args.synthetic)
            proc, url, startup = start(Path(tmp), env)
            try:
                load(url, "synthetic", images, 32, 4)  # warm-up
                runs = {
                    f"{c}_clients": load(url, "synthetic", images, n, c)
                    for c, n in ((1, 200), (4, 400), (16, 500))
                }
                rss = rss_mb(proc)
            finally:
                stop(proc)
        print(
            json.dumps(
                {"domain": info, "startup_s": round(startup, 1), "search": runs, "rss_mb": rss}, indent=2
            )
        )
        return
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
