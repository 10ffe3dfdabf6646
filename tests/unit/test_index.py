"""simserver.index: FAISS search checked against exact NumPy search, and (de)serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simserver import metrics
from simserver.index import DomainIndex, Item

N, DIM = 300, 24


def numpy_distances(metric: str, x: np.ndarray, q: np.ndarray) -> np.ndarray:
    x, q = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        return 1.0 - xn @ (q / np.linalg.norm(q))
    if metric == "ip":
        return 1.0 - x @ q
    if metric == "l2":
        return np.sqrt(((x - q) ** 2).sum(axis=1))
    if metric == "l1":
        return np.abs(x - q).sum(axis=1)
    raise AssertionError(metric)


def make_items(n: int) -> list[Item]:
    return [
        Item(
            f"cat{i % 3}/img{i}.png",
            f"cat{i % 3}",
            f"domains/d/images/{i:064x}.png",
            "image/png",
            {"sku": str(i)},
            str(i),  # the stable id; FAISS's row number is internal
        )
        for i in range(n)
    ]


def make_index(metric: str, vectors: np.ndarray, version: str = "v1") -> DomainIndex:
    return DomainIndex.build(
        vectors, make_items(len(vectors)), metric=metric, encoder_id="fake:1", version=version
    )


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(42)
    x = rng.standard_normal((N, DIM)).astype(np.float32) * rng.uniform(0.5, 3, (N, 1)).astype(np.float32)
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    return x, queries


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_search_matches_exact_numpy_search(metric, data):
    x, queries = data
    index = make_index(metric, x)
    for q in queries:
        hits = index.search(q[None], 10)[0]
        expected = numpy_distances(metric, x, q)
        order = np.argsort(expected, kind="stable")[:10]
        assert [int(h.id) for h in hits] == order.tolist()
        np.testing.assert_allclose([h.distance for h in hits], expected[order], rtol=1e-4, atol=1e-4)
        scores = [h.score for h in hits]
        np.testing.assert_allclose(scores, metrics.distance_to_score(metric, expected[order]), atol=1e-4)
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert scores == sorted(scores, reverse=True)
        for h in hits:
            item = index.items[int(h.id)]
            assert (h.name, h.label, h.metadata) == (item.name, item.label, item.metadata)


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_search_distance_equals_pairwise_distance(metric, data):
    """/search and /similarity must agree on what the distance between two images is."""
    x, queries = data
    index = make_index(metric, x)
    for q in queries[:3]:
        for h in index.search(q[None], 5)[0]:
            expected = metrics.pairwise_distance(metric, q, x[int(h.id)])
            assert h.distance == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_identical_vector_scores_one(metric, data):
    x, _ = data
    if metric == "ip":  # inner product only means "identical = 1" for unit vectors (like the encoder's)
        x = metrics.l2_normalize(x)
    index = make_index(metric, x)
    for i in (0, 7, N - 1):
        top = index.search(x[i][None], 3)[0][0]
        assert top.id == str(i)
        assert top.distance == pytest.approx(0.0, abs=1e-5)
        assert top.score == pytest.approx(1.0, abs=1e-5)


def test_cosine_ignores_magnitude(data):
    x, queries = data
    index = make_index("cosine", x)
    a = [(h.id, round(h.distance, 5)) for h in index.search(queries[0][None], 10)[0]]
    b = [(h.id, round(h.distance, 5)) for h in index.search((queries[0] * 37.5)[None], 10)[0]]
    assert a == b


def test_top_k_larger_than_count():
    x = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32)
    index = make_index("l2", x)
    hits = index.search(x[0][None], 50)[0]
    assert len(hits) == 4
    assert sorted(int(h.id) for h in hits) == [0, 1, 2, 3]
    assert index.search(x[0][None], 0)[0] == []


def test_hit_metadata_is_a_copy(data):
    x, _ = data
    index = make_index("l2", x)
    hit = index.search(x[0][None], 1)[0][0]
    hit.metadata["sku"] = "tampered"
    assert index.items[0].metadata["sku"] == "0"


def test_meta_describes_the_index(data):
    x, _ = data
    index = DomainIndex.build(
        x, make_items(N), metric="cosine", encoder_id="fake:1", version="v7", extra_meta={"skipped": 2}
    )
    m = index.meta
    assert (m["dim"], m["metric"], m["encoder_id"]) == (DIM, "cosine", "fake:1")
    assert (m["count"], m["version"]) == (N, "v7")
    assert m["labels"] == {"cat0": 100, "cat1": 100, "cat2": 100}
    assert m["skipped"] == 2
    assert "T" in m["created_at"] and m["created_at"].endswith("+00:00")
    assert (index.dim, index.metric, index.version, len(index)) == (DIM, "cosine", "v7", N)


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_files_round_trip(metric, data):
    x, queries = data
    index = make_index(metric, x, version="20250101T000000-abcdef")
    files = index.to_files()
    assert set(files) == set(DomainIndex.FILES)
    assert all(isinstance(v, bytes) for v in files.values())
    json.loads(files["meta.json"])
    loaded = DomainIndex.from_files({k: bytes(v) for k, v in files.items()})
    assert loaded.meta == index.meta
    for key in ("dim", "metric", "encoder_id", "count", "labels", "version", "created_at"):
        assert loaded.meta[key] == index.meta[key]
    assert loaded.items == index.items
    assert loaded.faiss.ntotal == N
    for q in queries:
        assert loaded.search(q[None], 15)[0] == index.search(q[None], 15)[0]


def test_bad_inputs_are_refused(data):
    x, _ = data
    index = make_index("l2", x)
    with pytest.raises(ValueError, match="dim"):
        index.search(np.zeros(DIM + 1)[None], 3)[0]
    with pytest.raises(ValueError):
        DomainIndex.build(x, make_items(N - 1), metric="l2", encoder_id="e", version="v")
    with pytest.raises(ValueError, match="metric"):
        DomainIndex.build(x, make_items(N), metric="hamming", encoder_id="e", version="v")
    with pytest.raises(ValueError):
        DomainIndex(index.faiss, make_items(N - 1), index.meta)
