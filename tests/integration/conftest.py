"""Integration fixtures: the built-in encoder (built once), a demo store, a real `bentoml serve`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import DEMO, ROOT, TEST_DATA

__all__ = ["DEMO", "ROOT", "TEST_DATA"]

# A scratch domain for training and limit tests, so they do not disturb the demo domains' searches.
SCRATCH_YAML = """\
name: scratch
description: "test domain"
encoder: builtin
metric: cosine
top_k: 4
limits:
  max_upload_bytes: 30000000
  max_entries: 60
  max_uncompressed_bytes: 20000000
  max_image_pixels: 4000000
"""

# A domain with titles, shops and product ids and no demo data: tests/integration/test_fusion_http.py
# trains it (its yaml's weights are image only, so learned weights show).
SHOPS_YAML = """\
name: shops
description: "fusion-learning test domain"
limits: {max_entries: 200}
training: {mode: pretrained}
text:
  fields: [title]
  group: shop
  product: product
  weights: {image: 1.0, text: 0.0}
"""


@pytest.fixture(scope="session")
def builtin_tag() -> str:
    from simserver.encoder import build_builtin
    from simserver.settings import get_settings
    from simserver.text_encoder import build_builtin_text

    build_builtin_text()  # the food demo domain has text configured: its server loads this too
    return build_builtin(get_settings().builtin_model)


@pytest.fixture(scope="session")
def encoder(builtin_tag):
    from simserver.encoder import Encoder

    return Encoder("builtin")


@pytest.fixture(scope="session")
def domains_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("domains")
    for f in (ROOT / "domains").glob("*.yaml"):
        shutil.copy(f, d / f.name)
    (d / "scratch.yaml").write_text(SCRATCH_YAML)
    (d / "shops.yaml").write_text(SHOPS_YAML)
    return d


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory, encoder, domains_dir) -> Path:
    """A store with every demo domain built once (through the same code as the CLI)."""
    from simserver.domain_config import load_domains
    from simserver.ingest import read_folder
    from simserver.repository import Repository
    from simserver.store import LocalStore
    from simserver.training import train_domain

    root = tmp_path_factory.mktemp("store")
    repo = Repository(LocalStore(root))
    for cfg in load_domains(domains_dir).values():
        if demo := cfg.demo_path():
            ds = read_folder(demo, cfg.limits)
            train_domain(repo, cfg, ds, PretrainedBackend(encoder), mode="pretrained")
    return root


class PretrainedBackend:
    """A training backend that only encodes (``mode="pretrained"`` never fits a head)."""

    def __init__(self, encoder) -> None:
        self.encoder, self.encoder_id, self.encode = encoder.name, encoder.id, encoder.encode

    def train_head(self, *args):
        raise AssertionError("pretrained builds never fit a head")

    def export(self, *args):
        raise AssertionError("pretrained builds never export")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ZMQ_PORT_RACE = "ZMQError: Address already in use"


class Server:
    def __init__(
        self, env: dict[str, str], log: Path, target: str = "service:ImageSimilarity", cwd: Path = ROOT
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env, self.target, self.cwd = env, target, cwd
        self.log = log
        self.probe_hangs = 0  # /readyz probes during startup that got no answer
        self._spawn()

    def restart(self) -> float:
        """SIGTERM, then the same server again (same port, environment and store)."""
        self.stop()
        self.log = self.log.with_suffix(".restarted.log")
        self._spawn()
        return self.wait_ready()

    def _spawn(self) -> None:
        env, target, cwd, log = self.env, self.target, self.cwd, self.log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                target,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--timeout-graceful-shutdown",
                "10",
            ],
            cwd=cwd,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.monotonic()

    def wait_ready(self, timeout: float = 180) -> float:
        deadline = time.monotonic() + timeout
        gateway_up = False
        respawns = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text(errors="replace")
                if ZMQ_PORT_RACE in log and respawns < 2:
                    # BentoML reserves its process manager's (circus) control ports and releases
                    # them before circus binds them (bentoml/_internal/utils/circus): in between,
                    # another process may take one as an ephemeral port (seen once in CI, at the
                    # start). Nothing was served yet, so a new start is the same test.
                    respawns += 1
                    self._spawn()
                    continue
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{log[-4000:]}")
            # A probe sent before the gateway's worker runs waits in the listen backlog of the
            # socket BentoML binds first (10-20 s on a loaded machine): nothing of ours can answer it.
            gateway_up = gateway_up or self._gateway_initialized()
            try:
                # Once the gateway runs, a probe must get an answer (503 while starting), not hang:
                # count those that did.
                if requests.get(f"{self.url}/readyz", timeout=(2, 15)).status_code == 200:
                    return time.monotonic() - self.started
            except requests.ReadTimeout:
                self.probe_hangs += gateway_up
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def _gateway_initialized(self) -> bool:
        try:
            log = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return False
        return any("[entry_service:" in line and "initialized" in line for line in log.splitlines())

    def processes(self) -> list[psutil.Process]:
        """The server and every service worker it started (workers get process groups of their own)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 40) -> float | None:
        """SIGTERM; seconds until the server and all its workers exited, or None if any had to be
        killed (they are killed then, so no test leaves processes behind)."""
        processes = self.processes()
        if self.proc.poll() is not None and not processes:
            return 0.0
        t0 = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _, alive = psutil.wait_procs(processes, timeout=max(1.0, timeout - (time.monotonic() - t0)))
        for p in alive:
            p.kill()
        took = time.monotonic() - t0
        return None if alive or took >= timeout else took


class MotoServer:
    """moto's standalone S3/CloudFormation/... server on a free 127.0.0.1 port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        for _ in range(150):
            try:
                requests.get(f"{self.url}/moto-api/", timeout=1)
                return
            except requests.RequestException:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto server exited:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        raise TimeoutError("moto server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def server_env(store: Path, domains_dir: Path, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        STORE_URI=f"file://{store}",
        DOMAINS_DIR=str(domains_dir),
        BENTOML_RESULT_STORE=str(tmp / "task-results.db"),
        POINTER_POLL_SECONDS="1",
        PYTHONPATH=str(ROOT),
        # The services' log lines reach server.log as they are written (tests read them).
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def server(tmp_path_factory, demo_store, domains_dir, builtin_tag):
    tmp = tmp_path_factory.mktemp("server")
    srv = Server(server_env(demo_store, domains_dir, tmp), tmp / "server.log")
    srv.startup_seconds = srv.wait_ready()
    yield srv
    srv.stop()


# Fine-tuning and relevance tests share a server with its own store: `ft` (a plain domain) and `nuts`
# (a target label, as almonds-suppliers).
TRAIN_DOMAINS = {
    "ft": """\
name: ft
description: "fine-tuning test domain"
limits: {max_entries: 200}
training: {augment_views: 1}
""",
    "nuts": """\
name: nuts
description: "relevance test domain"
target_label: peanuts
limits: {max_entries: 200}
training: {metric_loss: multi_similarity, augment_views: 2}
""",
}


@pytest.fixture(scope="session")
def train_server(tmp_path_factory, builtin_tag):
    tmp = tmp_path_factory.mktemp("train-server")
    domains = tmp / "domains"
    domains.mkdir()
    for name, text in TRAIN_DOMAINS.items():
        (domains / f"{name}.yaml").write_text(text)
    env = server_env(tmp / "store", domains, tmp)
    env["STORE_CACHE_DIR"] = str(tmp / "cache")
    srv = Server(env, tmp / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()
