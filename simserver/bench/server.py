"""A real ``bentoml serve`` for benchmarks: start, wait until ready, measure per process, stop."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from simserver.bench.common import BenchError
from simserver.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300


class ServerError(BenchError):
    """The server did not come up (its log says why)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``bentoml serve service:ImageSimilarity`` on a free 127.0.0.1 port, in its own process group
    (so one signal reaches the supervisor and every worker). ``startup_s``: until ``/readyz`` is 200."""

    def __init__(self, scratch: Path, env: dict[str, str] | None = None, source: Path | None = None) -> None:
        """``source``: the checkout whose service.py and runners/ are served (default: this one)."""
        source = (source or PROJECT_ROOT).resolve()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = scratch / f"server-{self.port}.log"
        full_env = {
            "BENTOML_HOME": str(PROJECT_ROOT / "var" / "bentoml"),
            "STORE_URI": f"file://{PROJECT_ROOT}/var/store",
            **os.environ,
            # One task-result database per server: two servers sharing one break each other's.
            "BENTOML_RESULT_STORE": str(scratch / f"tasks-{self.port}.db"),
            **(env or {}),
        }
        if source != PROJECT_ROOT:
            # Its own simserver package too, not this checkout's installed one.
            full_env["PYTHONPATH"] = str(source)
        t0 = time.monotonic()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bentoml",
                    "serve",
                    "service:ImageSimilarity",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    # Without it a server with requests in flight may never stop on SIGTERM.
                    "--timeout-graceful-shutdown",
                    "10",
                ],
                cwd=source,  # bentoml imports service.py and runners/ from here
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        logger.info("server ready on %s in %.1f s", self.url, self.startup_s)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited during startup:\n{self._log_tail()}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise ServerError(f"server not ready in {STARTUP_TIMEOUT_S} s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> float:
        """SIGTERM to the whole group; seconds until the supervisor exited."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                logger.warning("server %s ignored SIGTERM for 60 s: killing it", self.url)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        return time.monotonic() - t0

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the benchmarks read ----------------------------------------------------------------
    def stats(self) -> dict:
        """``GET /stats``: the encoder's adaptive batching since start."""
        return requests.get(f"{self.url}/stats", timeout=30).json()

    def wait_idle(self, timeout: float = 300) -> None:
        """The encoder traces export templates in the background when a training starts; measure
        after that, or the tracing competes with what is measured."""
        deadline = time.monotonic() + timeout
        while not self.stats()["export_templates_ready"] and time.monotonic() < deadline:
            time.sleep(0.5)

    def by_role(self, measure: Callable[[psutil.Process], float]) -> dict[str, float]:
        """``measure`` summed over the server's processes, by what each process does."""
        root = psutil.Process(self.proc.pid)
        out: dict[str, float] = {}
        for p in [root, *root.children(recursive=True)]:
            try:
                role, value = _role(p), measure(p)
            except psutil.Error:  # a worker that exited meanwhile
                continue
            out[role] = out.get(role, 0.0) + value
        return out

    def rss_mb(self) -> dict[str, float]:
        out = self.by_role(lambda p: p.memory_info().rss / 2**20)
        out["total"] = sum(out.values())
        return {k: round(v, 1) for k, v in out.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) so far per server role, and of this (the client) process."""
        out = self.by_role(lambda p: sum(p.cpu_times()[:2]))
        out["client"] = sum(psutil.Process().cpu_times()[:2])
        return out


def _role(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    if "encoder" in cmd:
        return "encoder"
    if "index-" in cmd:
        return "index"
    if "trainer" in cmd:
        return "trainer"
    if "ImageSimilarity" in cmd and "worker" in cmd:
        return "gateway"
    return "supervisor/other"
