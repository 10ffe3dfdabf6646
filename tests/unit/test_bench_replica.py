"""``simserver bench replica``: the version is built and loaded in processes of their own."""

from simserver.bench.replica import replica_memory


def test_replica_memory_counts_at_least_the_float32_vectors_each_item_keeps():
    out = replica_memory(n=4000, kinds=("flat",), d=64)
    flat = out["kinds"]["flat"]
    # Every item keeps its float32 vector (256 B at d=64) and an item record (~1 KB as Python objects).
    assert 64 * 4 < flat["bytes_per_item"] < 20_000
    assert flat["recall_at_10"] == 1.0
    gb = flat["gb_at"]
    # The stated rule: linear in N (bytes_per_item x N; both sides rounded, to 1 B and 0.01 GB).
    for size in (100_000, 1_000_000, 10_000_000):
        assert abs(gb[f"{size:,}"] - flat["bytes_per_item"] * size / 1e9) <= 0.005 + 0.5 * size / 1e9
