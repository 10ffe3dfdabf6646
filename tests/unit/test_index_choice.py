"""Index choice by size: exact up to flat_max, HNSW or IVF-PQ above, recall measured on every build."""

from __future__ import annotations

import numpy as np
import pytest

from simserver.index import DomainIndex, Item
from simserver.index_choice import IndexPolicy, choose_kind, recall_at_10


def clustered(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, d))
    x = centres[rng.integers(0, 32, n)] + 0.3 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def oracle_recall(index, xs: np.ndarray, metric: str, sample: int) -> float:
    ids = np.random.default_rng(0).choice(len(xs), size=sample, replace=False)
    if metric == "l2":
        dist = ((xs[ids, None, :] - xs[None, :, :]) ** 2).sum(-1)
    else:
        dist = -(xs[ids] @ xs.T)
    dist[np.arange(len(ids)), ids] = np.inf  # leave the query itself out
    truth = np.argsort(dist, axis=1)[:, :10]
    _, got = index.search(xs[ids], 11)
    hits = [
        len(set(t) & set([g for g in row if g != own][:10]))
        for own, t, row in zip(ids, truth, got, strict=True)
    ]
    return sum(hits) / (10 * len(ids))


def items(n: int) -> list[Item]:
    return [Item(f"c/{i}.png", f"c{i % 5}", f"k{i}", "image/png") for i in range(n)]


def test_rule():
    p = IndexPolicy(flat_max=1000, memory_budget_bytes=10**9)
    assert choose_kind(1000, 1280, "cosine", p) == "flat"
    assert choose_kind(1001, 1280, "cosine", p) == "hnsw"
    # 1M x 1280: HNSW needs ~5.4 GB, over fp16 vectors ~2.8 GB
    assert choose_kind(10**6, 1280, "cosine", p) == "ivfpq"  # budget 1 GB
    assert choose_kind(10**6, 1280, "cosine", p.model_copy(update={"memory_budget_bytes": 4 * 2**30})) == (
        "hnsw_fp16"
    )
    assert (
        choose_kind(10**6, 1280, "cosine", p.model_copy(update={"memory_budget_bytes": 6 * 2**30})) == "hnsw"
    )
    assert choose_kind(10**6, 1280, "l1", p) == "flat"
    # an approximate kind asked for explicitly would rank by L2: L1 stays exact
    assert choose_kind(5000, 64, "l1", IndexPolicy(kind="hnsw")) == "flat"
    assert choose_kind(10, 8, "l2", IndexPolicy(kind="ivfpq")) == "ivfpq"


@pytest.mark.parametrize(
    ("metric", "kind", "refine"),
    [
        ("cosine", "hnsw", "auto"),
        ("l2", "hnsw", "auto"),
        ("cosine", "hnsw_fp16", "auto"),
        ("cosine", "ivfpq", "none"),
        ("cosine", "ivfpq", "sq8"),
    ],
)
def test_approximate_builds_measure_recall_against_exact(metric, kind, refine):
    x = clustered(3000)
    policy = IndexPolicy(
        flat_max=500, kind="auto" if kind == "hnsw" else kind, ivf_nprobe=16, ivfpq_refine=refine
    )
    idx = DomainIndex.build(x, items(len(x)), metric=metric, encoder_id="e", version="v", policy=policy)
    assert idx.meta["index_kind"] == kind
    # PQ codes alone trade recall for ~16x less memory; re-ranking with 8-bit vectors wins it back.
    floor = {"hnsw": 0.9, "hnsw_fp16": 0.9, "none": 0.3, "sq8": 0.9}[kind if kind != "ivfpq" else refine]
    assert floor <= idx.meta["recall_at_10"] <= 1.0
    assert idx.meta["bytes_per_vector"] > 0
    if kind == "hnsw_fp16":  # the same graph over half-size vectors: 2 bytes less per dimension
        full = DomainIndex.build(
            x,
            items(len(x)),
            metric=metric,
            encoder_id="e",
            version="v",
            policy=policy.model_copy(update={"kind": "hnsw"}),
        )
        assert full.meta["bytes_per_vector"] - idx.meta["bytes_per_vector"] == pytest.approx(2 * 64, abs=4)
    if kind == "ivfpq":
        # smaller than the raw float vector: PQ codes alone, or plus one byte per dimension
        assert idx.meta["bytes_per_vector"] < 64 * 4
        assert idx.meta["faiss_index"] == ("IndexIVFPQ" if refine == "none" else "IndexRefine")
    # The stored figure is what an independent oracle measures: NumPy brute force over the same
    # sampled queries (seed 0), each leaving itself out.
    xs = x if metric != "cosine" else x / np.linalg.norm(x, axis=1, keepdims=True)
    assert oracle_recall(idx.faiss, xs, metric, 200) == pytest.approx(idx.meta["recall_at_10"], abs=0.01)
    assert recall_at_10(idx.faiss, xs, metric, 200) == pytest.approx(idx.meta["recall_at_10"], abs=1e-4)
    # Search through the DomainIndex API still returns scored hits, best first.
    hits = idx.search(x[7][None], 5)[0]
    assert len(hits) == 5 and hits[0].score >= hits[-1].score
    round_trip = DomainIndex.from_files(idx.to_files())
    assert [h.id for h in round_trip.search(x[7][None], 5)[0]] == [h.id for h in hits]


def test_flat_is_exact_and_says_so():
    x = clustered(300)
    idx = DomainIndex.build(x, items(300), metric="l2", encoder_id="e", version="v")
    assert idx.meta["index_kind"] == "flat" and idx.meta["recall_at_10"] == 1.0
    assert idx.meta["bytes_per_vector"] >= 64 * 4


def test_recall_leaves_the_query_itself_out():
    """A compressed index that finds each indexed vector but ranks its neighbours randomly would
    score 0.1+ if the query counted as its own neighbour; leave-one-out scores it at chance."""
    import faiss

    x = clustered(2000)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    class SelfThenRandom:
        def search(self, q, k):
            rng = np.random.default_rng(1)
            own = np.array([int(np.argmax(x @ row)) for row in q])
            rest = rng.integers(0, len(x), (len(q), k - 1))
            return np.zeros((len(q), k), np.float32), np.column_stack([own, rest])

    assert recall_at_10(SelfThenRandom(), x, "cosine", 100) < 0.05
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    assert recall_at_10(exact, x, "cosine", 100) == 1.0


def test_faiss_threads_one_for_a_query_all_for_a_batch():
    import faiss

    from simserver.cpu import PARALLEL_QUERIES, faiss_threads, usable_cpus

    faiss_threads(1)
    assert faiss.omp_get_max_threads() == 1
    faiss_threads(PARALLEL_QUERIES)
    assert faiss.omp_get_max_threads() == usable_cpus()


def test_usable_cpus_honours_a_container_quota(tmp_path):
    from simserver.cpu import cgroup_cpu_quota

    assert cgroup_cpu_quota(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5
    assert cgroup_cpu_quota(tmp_path) == 2
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 1
