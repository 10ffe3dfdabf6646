"""simserver.searcher: a reply never mixes two versions; refusals for a domain that cannot answer."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

from simserver.catalog import Catalog
from simserver.domain_config import DomainConfig
from simserver.errors import Conflict, RequestRefused, UnknownItem
from simserver.index import DomainIndex, Item
from simserver.ingest import read_zip
from tests.unit.conftest import BLUE, GREEN, RED, fake_encode, make_zip, solid

CFG = DomainConfig(name="shop", encoder="base")


def version(name: str, encoder: str, seed: int, labels=("warm", "cool")) -> Catalog:
    vectors = np.random.default_rng(seed).standard_normal((4, 32)).astype(np.float32)
    items = [Item(f"{labels[i % 2]}/{i}.png", labels[i % 2], f"k{i}", "image/png") for i in range(4)]
    return Catalog.of(
        DomainIndex.build(
            vectors, items, metric="cosine", encoder_id=encoder, version=name, extra_meta={"encoder": encoder}
        )
    )


def test_the_reply_comes_from_the_version_whose_encoder_encoded_the_query():
    v1, v2 = version("v1", "store:one", 1), version("v2", "store:two", 2)
    served = {"now": v1}
    used: list[str] = []

    async def encode(images: np.ndarray, encoder: str) -> np.ndarray:
        used.append(encoder)
        served["now"] = v2  # a new version goes live while this query is being encoded
        return fake_encode(images)

    from simserver.searcher import Searcher

    searcher = Searcher(CFG, lambda: served["now"], encode)
    reply = anyio.run(searcher.search, np.zeros((224, 224, 3), np.uint8), 3)
    assert used == ["store:one"] and reply.version == "v1" and len(reply.results) == 3
    reply = anyio.run(searcher.search, np.zeros((224, 224, 3), np.uint8), 3)
    assert used[-1] == "store:two" and reply.version == "v2"


def test_refusals():
    from simserver.searcher import Searcher

    async def encode(images, encoder):
        return np.ones((len(images), 8), np.float32)  # 8-d: not what the index holds (32-d)

    empty = Searcher(CFG, lambda: None, encode)
    with pytest.raises(Conflict, match="no index yet"):
        anyio.run(empty.search, np.zeros((224, 224, 3), np.uint8), 3)
    with pytest.raises(UnknownItem):
        empty.item("warm/0.png")
    assert empty.status().version is None
    mismatched = Searcher(CFG, lambda: version("v1", "base", 1), encode)
    with pytest.raises(Conflict, match="retrain"):
        anyio.run(mismatched.search, np.zeros((224, 224, 3), np.uint8), 3)
    with pytest.raises(UnknownItem, match="no item 'cool/4.png'"):
        mismatched.item("cool/4.png")
    assert mismatched.item("cool/3.png").image_key == "k3"
    site = read_zip(make_zip({"a.png": solid(RED), "b.png": solid(GREEN)}), CFG.limits, labelled=False)
    with pytest.raises(RequestRefused, match="target_label"):
        anyio.run(mismatched.relevance, site)


def test_relevance_encodes_each_site_image_once_in_batches():
    from simserver.searcher import Searcher

    cfg = DomainConfig(name="nuts", target_label="warm", encoder="base")
    calls: list[int] = []

    async def encode(images, encoder):
        calls.append(len(images))
        return fake_encode(images)

    entries = {f"{i}.png": solid(c) for i, c in enumerate([RED, GREEN, BLUE, RED, GREEN])}
    site = read_zip(make_zip(entries), cfg.limits, labelled=False)
    searcher = Searcher(cfg, lambda: version("v1", "base", 3), encode, batch_size=2)
    reply = anyio.run(searcher.relevance, site)
    assert calls == [2, 2, 1] and [i.name for i in reply.images] == sorted(entries)
    assert reply.version == "v1" and reply.target == "warm" and 0 <= reply.fraction <= 1


def test_relevance_refuses_a_version_without_target_images():
    """A domain whose yaml names a target the served version was not trained with: 409, not a
    silent "irrelevant" for every site."""
    from simserver.searcher import Searcher

    cfg = DomainConfig(name="nuts", target_label="almonds", encoder="base")
    calls: list[int] = []

    async def encode(images, encoder):
        calls.append(len(images))
        return fake_encode(images)

    site = read_zip(make_zip({"a.png": solid(RED)}), cfg.limits, labelled=False)
    searcher = Searcher(cfg, lambda: version("v1", "base", 3), encode)
    with pytest.raises(Conflict) as err:
        anyio.run(searcher.relevance, site)
    assert err.value.status == 409 and calls == []  # refused before anything is encoded
    assert (
        "'almonds'" in err.value.message and "cool, warm" in err.value.message and "v1" in err.value.message
    )
