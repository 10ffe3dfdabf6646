"""The real gateway (service.py, its middleware and BentoML's request handling) in-process, with
fake index, trainer and encoder services: every 4xx path without TensorFlow or a server.

A fake refuses the way a real service's refusal reaches the gateway: BentoML's HTTP client raises
``BentoMLException(<the service's JSON body>, error_code=<status>)``.
"""

from __future__ import annotations

import importlib
import io
import json
import os
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bentoml.exceptions import BentoMLException
from PIL import Image
from starlette.testclient import TestClient

from simserver.errors import RequestRefused
from simserver.schemas import (
    DeleteReply,
    EncoderStats,
    Hit,
    IndexStatus,
    ItemInfo,
    ItemPage,
    ItemRecord,
    ItemsReply,
    RelevanceReply,
    SearchReply,
    SimilarityReply,
    TrainReply,
    VersionInfo,
)

DOMAINS = {
    "shop": "limits: {max_upload_bytes: 60000, max_image_pixels: 1000000}\n",
    "nuts": "target_label: peanuts\n",
}


def remote(exc: RequestRefused) -> BentoMLException:
    """What BentoML's client raises when a service answers ``exc``: its body, ``[{"error": ...}]``."""
    return BentoMLException(json.dumps([{"error": exc.message}]), error_code=HTTPStatus(exc.status))


class Fake:
    """A dependency client: ``svc.dep.to_async.method(...)``; records calls; ``refuse[method]``
    makes that method answer as the real service refusing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse: dict[str, RequestRefused] = {}

    @property
    def to_async(self) -> Fake:
        return self

    def _call(self, method: str, **kwargs: Any) -> None:
        self.calls.append((method, kwargs))
        if method in self.refuse:
            raise remote(self.refuse[method])

    async def is_ready(self, timeout: int | None = None) -> bool:
        return True

    async def close(self) -> None:
        pass


class FakeIndex(Fake):
    def __init__(self, domain: str) -> None:
        super().__init__()
        self.domain = domain

    async def search(self, image: np.ndarray, top_k: int, filter: dict | None = None) -> SearchReply:
        self._call("search", image=image, top_k=top_k, filter=filter)
        hit = Hit(id="a/0.png", name="a/0.png", label="a", score=1.0, distance=0.0)
        return SearchReply(domain=self.domain, version="v1", results=[hit] * min(top_k, 3))

    async def pair(self, images: np.ndarray) -> SimilarityReply:
        self._call("pair", images=images)
        return SimilarityReply(
            metric="cosine",
            distance=0.2,
            score=0.8,
            domain=self.domain,
            version="v1",
            same_label=True,
            threshold=0.3,
        )

    async def similar(self, item_id: str, top_k: int, filter: dict | None = None) -> SearchReply:
        self._call("similar", item_id=item_id, top_k=top_k, filter=filter)
        hit = Hit(id="a/1.png", name="a/1.png", label="a", score=0.9, distance=0.1)
        return SearchReply(domain=self.domain, version="v1", results=[hit] * min(top_k, 2))

    async def upsert(self, **kwargs: Any) -> ItemsReply:
        self._call("upsert", **kwargs)
        return ItemsReply(
            version="v2", added=len(kwargs.get("images") or []), replaced=0, skipped=[], count=4
        )

    async def delete(self, ids=None, filter=None, must_exist: bool = False) -> DeleteReply:
        self._call("delete", ids=ids, filter=filter, must_exist=must_exist)
        return DeleteReply(version="v3", deleted=len(ids or []), count=2)

    async def list_items(self, label=None, offset: int = 0, limit: int = 100) -> ItemPage:
        self._call("list_items", label=label, offset=offset, limit=limit)
        return ItemPage(domain=self.domain, version="v1", total=1, offset=offset, limit=limit, items=[])

    async def get_item(self, item_id: str) -> ItemRecord:
        self._call("get_item", item_id=item_id)
        return ItemRecord(id=item_id, name="a/0.png", label="a")

    async def versions(self) -> list[VersionInfo]:
        self._call("versions")
        return [VersionInfo(version="v1", created_at=None, count=3, kind="train", active=True)]

    async def activate(self, version: str) -> VersionInfo:
        self._call("activate", version=version)
        return VersionInfo(
            version="v9", created_at=None, count=3, kind="activate", active=True, activated_from=version
        )

    async def relevance(self, **kwargs: Any) -> RelevanceReply:
        self._call("relevance", **kwargs)
        return RelevanceReply(
            domain=self.domain,
            version="v1",
            relevant=False,
            fraction=0.0,
            target="peanuts",
            image_threshold=0.0,
            site_threshold=0.25,
            site_rule="fixed",
            images=[],
            skipped=[],
        )

    async def item(self, item_id: str) -> ItemInfo:
        self._call("item", item_id=item_id)
        return ItemInfo(
            version="v1", id=item_id, name="a/0.png", label="a", image_key="missing", content_type="image/png"
        )

    async def status(self) -> IndexStatus:
        self._call("status")
        return IndexStatus(version="v1", count=3, labels={"a": 3})

    async def reload(self) -> IndexStatus:
        self._call("reload")
        return IndexStatus(version="v2")


class FakeTrainer(Fake):
    async def train(
        self,
        domain: str,
        archive: bytes,
        mode: str | None = None,
        catalog: str | None = None,
        task_id: str | None = None,
    ) -> TrainReply:
        self._call("train", domain=domain, archive=archive, mode=mode, catalog=catalog, task_id=task_id)
        return TrainReply(version="v2", indexed=3, skipped=[], labels={"a": 3}, seconds=0.1)


class FakeEncoder(Fake):
    async def encode(self, images: np.ndarray, encoder: str = "builtin") -> np.ndarray:
        self._call("encode", images=images, encoder=encoder)
        flat = images.reshape(len(images), -1).astype(np.float32)[:, :8] + 1
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    async def stats(self) -> EncoderStats:
        self._call("stats")
        return EncoderStats(batching={}, export_templates_ready=True)


class Gateway:
    def __init__(self, client: TestClient, service: Any) -> None:
        self.client = client
        self.service = service
        deps = service.ImageSimilarity.dependencies
        self.encoder: FakeEncoder = deps["encoder"]._resolved
        self.trainer: FakeTrainer = deps["trainer"]._resolved
        self.index: dict[str, FakeIndex] = {
            name: deps[attr]._resolved for name, attr in service._DEP_ATTR.items()
        }

    def reset(self) -> None:
        for fake in [self.encoder, self.trainer, *self.index.values()]:
            fake.calls.clear()
            fake.refuse.clear()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("gateway")
    domains = tmp / "domains"
    domains.mkdir()
    for name, text in DOMAINS.items():
        (domains / f"{name}.yaml").write_text(text)
    env = {
        "STORE_URI": f"file://{tmp / 'store'}",
        "STORE_CACHE_DIR": str(tmp / "cache"),
        "DOMAINS_DIR": str(domains),
        "BENTOML_RESULT_STORE": str(tmp / "task-results.db"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from simserver.settings import get_settings

    try:
        get_settings.cache_clear()
        from _bentoml_impl.tasks.result import Sqlite3Store

        Sqlite3Store.init_db(
            env["BENTOML_RESULT_STORE"]
        )  # `bentoml serve` does this before its workers start
        service = importlib.import_module("service")  # reads the settings and the domains at import
        deps = service.ImageSimilarity.dependencies
        deps["encoder"]._resolved = FakeEncoder()
        deps["trainer"]._resolved = FakeTrainer()
        for name, attr in service._DEP_ATTR.items():
            deps[attr]._resolved = FakeIndex(name)
        client = TestClient(service.ImageSimilarity.to_asgi(is_main=True))
        client.__enter__()  # the lifespan: the service instance and the task database
    finally:
        # At once, not at the end of the session: later tests start servers and commands that
        # inherit this process's environment.
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()
    try:
        yield Gateway(client, service)
    finally:
        client.__exit__(None, None, None)


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    gateway.reset()
    return gateway


def png(size: tuple[int, int] = (40, 30), color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def error_of(resp, status: int, *words: str) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    for w in words:
        assert w.lower() in body["error"].lower(), body
    return body["error"]


__all__ = ["Path", "error_of", "png"]
