"""What one hostile request costs a real server, and a soak of many good and bad ones.

:func:`worst_inputs` sends each of the outside test's worst inputs (small files that decode to tens
of millions of pixels, a zip bomb, a zip of such images) to a real ``bentoml serve`` and prints, per
input, its status, the peak RSS it added to the server (all processes, sampled every 20 ms) and the
CPU seconds the server spent on it. :func:`soak` sends thousands of searches mixed with bad inputs
and prints the errors that were not the expected 4xx and the gateway's memory before and after.
"""

from __future__ import annotations

import io
import logging
import random
import statistics
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

from simserver.bench.common import DEMO
from simserver.bench.server import Server

logger = logging.getLogger(__name__)

SIDE = 6300  # 39.7 megapixels: under the default 40,000,000-pixel limit


def _png(mode: str, side: int = SIDE) -> bytes:
    img = (
        Image.new(mode, (side, side))
        if mode == "I;16"
        else Image.new(mode, (side, side), (9, 9, 9, 9)[: len(mode)])
    )
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(side: int = SIDE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 60, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def hostile_inputs() -> dict[str, tuple[str, dict]]:
    """name -> (route, multipart files) for the worst inputs under the default limits."""
    png16 = _png("I;16")
    return {
        "search: 16-bit PNG 6300x6300": ("search", {"image": ("a.png", png16)}),
        "search: RGBA PNG 6300x6300": ("search", {"image": ("a.png", _png("RGBA"))}),
        "search: JPEG 6300x6300": ("search", {"image": ("a.jpg", _jpeg())}),
        "relevance: zip bomb (1 GiB of zeros)": (
            "relevance",
            {"archive": ("site.zip", _zip({"a.png": b"\0" * 2**30}))},
        ),
        "relevance: 8 x 16-bit PNG 6300x6300 (317 Mpx, under the budget)": (
            "relevance",
            {"archive": ("site.zip", _zip({f"p{i}.png": png16 for i in range(8)}))},
        ),
        "relevance: 12 x 16-bit PNG 6300x6300 (476 Mpx, over the budget)": (
            "relevance",
            {"archive": ("site.zip", _zip({f"p{i}.png": png16 for i in range(12)}))},
        ),
    }


class _PeakSampler:
    """The server's total RSS, sampled every ``every`` seconds while in a ``with`` block."""

    def __init__(self, server: Server, every: float = 0.02) -> None:
        self.server, self.every = server, every
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> _PeakSampler:
        self.base = self.server.rss_mb()["total"]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_mb()["total"])
            self._stop.wait(self.every)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss_mb()["total"])


def worst_inputs(domain: str = "almonds-suppliers") -> dict:
    """Each hostile input once against a fresh server on the project's store."""
    inputs = hostile_inputs()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch, Server(Path(scratch)) as server:
        server.wait_idle()
        for name, (route, files) in inputs.items():
            cpu0 = sum(v for k, v in server.cpu_seconds().items() if k != "client")
            t0 = time.perf_counter()
            with _PeakSampler(server) as rss:
                r = requests.post(f"{server.url}/{domain}/{route}", files=files, timeout=600)
            wall = time.perf_counter() - t0
            cpu = sum(v for k, v in server.cpu_seconds().items() if k != "client") - cpu0
            upload = sum(len(f[1]) for f in files.values())
            rows.append(
                {
                    "input": name,
                    "upload_bytes": upload,
                    "status": r.status_code,
                    "error": r.json().get("error") if r.status_code >= 400 else None,
                    "peak_rss_added_mb": round(rss.peak - rss.base, 1),
                    "server_cpu_s": round(cpu, 2),
                    "seconds": round(wall, 2),
                }
            )
            logger.info("%s: %d, +%.0f MB, %.1f CPU s", name, r.status_code, rss.peak - rss.base, cpu)
    return {
        "domain": domain,
        "inputs": rows,
        "worst_peak_rss_added_mb": max(r["peak_rss_added_mb"] for r in rows),
    }


def _bad_inputs(domain: str) -> list[tuple[str, Callable[[requests.Session, str], requests.Response]]]:
    """(what, call) pairs that must each be answered with a 4xx."""
    good = next(p for p in sorted((DEMO / "food").rglob("*.png")))
    data = good.read_bytes()

    def post(route: str, files: dict, form: dict | None = None, dom: str = domain):
        return lambda s, url: s.post(f"{url}/{dom}/{route}", files=files, data=form, timeout=60)

    return [
        ("not an image", post("search", {"image": ("a.png", b"hello")})),
        ("truncated PNG", post("search", {"image": ("a.png", data[: len(data) // 3])})),
        ("empty file", post("search", {"image": ("a.png", b"")})),
        ("top_k out of range", post("search", {"image": ("a.png", data)}, {"top_k": "1000"})),
        ("top_k not a number", post("search", {"image": ("a.png", data)}, {"top_k": "many"})),
        ("unknown domain", post("search", {"image": ("a.png", data)}, dom="no-such-domain")),
        ("missing field", post("search", {"picture": ("a.png", data)})),
        ("zip as image", post("search", {"image": ("a.png", _zip({"x/y.png": data}))})),
        (
            "not a zip",
            post("relevance", {"archive": ("s.zip", b"PK\x03\x04broken")}, dom="almonds-suppliers"),
        ),
        (
            "zip slip",
            post("relevance", {"archive": ("s.zip", _zip({"../x.png": data}))}, dom="almonds-suppliers"),
        ),
        ("unknown image id", lambda s, url: s.get(f"{url}/{domain}/images/999999", timeout=60)),
    ]


def soak(
    searches: int = 10_000, bad: int = 500, clients: int = 4, domain: str = "food", warm_up: int = 300
) -> dict:
    """``searches`` good searches and ``bad`` bad requests, shuffled, from ``clients`` threads."""
    images = [(p.name, p.read_bytes()) for p in sorted((DEMO / domain).rglob("*")) if p.is_file()][:60]
    bad_inputs = _bad_inputs(domain)
    rng = random.Random(0)
    plan = ["good"] * searches + ["bad"] * bad
    rng.shuffle(plan)
    local = threading.local()
    unexpected: dict[str, int] = {}
    lock = threading.Lock()

    def session() -> requests.Session:
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return local.s

    def one(i: int, kind: str, url: str) -> float:
        t0 = time.perf_counter()
        try:
            if kind == "good":
                name, data = images[i % len(images)]
                r = session().post(f"{url}/{domain}/search", files={"image": (name, data)}, timeout=60)
                ok, what = r.status_code == 200, f"search {r.status_code}"
            else:
                label, call = bad_inputs[i % len(bad_inputs)]
                r = call(session(), url)
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                ok = 400 <= r.status_code < 500 and isinstance(body.get("error"), str)
                what = f"{label} {r.status_code}"
        except requests.RequestException as exc:
            ok, what = False, type(exc).__name__
        if not ok:
            with lock:
                unexpected[what] = unexpected.get(what, 0) + 1
        return (time.perf_counter() - t0) * 1000

    with tempfile.TemporaryDirectory() as scratch, Server(Path(scratch)) as server:
        server.wait_idle()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda i: one(i, "good", server.url), range(warm_up)))
        rss_before = server.rss_mb()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            ms = list(pool.map(lambda ik: one(ik[0], ik[1], server.url), enumerate(plan)))
        wall = time.perf_counter() - t0
        rss_after = server.rss_mb()
    q = statistics.quantiles(ms, n=100)
    growth = {
        role: round(100 * (rss_after.get(role, 0.0) - mb) / mb, 1)
        for role, mb in rss_before.items()
        if mb > 0
    }
    return {
        "domain": domain,
        "searches": searches,
        "bad_inputs": bad,
        "clients": clients,
        "seconds": round(wall, 1),
        "rps": round(len(plan) / wall, 1),
        "p50_ms": round(q[49], 1),
        "p99_ms": round(q[98], 1),
        "unexpected": unexpected,
        "errors": sum(unexpected.values()),
        "rss_mb_after_warm_up": rss_before,
        "rss_mb_after": rss_after,
        "rss_growth_pct": growth,
    }
