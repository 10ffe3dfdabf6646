"""``simserver bench replica``: the version is built and loaded in processes of their own."""

from simserver.bench.replica import replica_memory


def test_replica_memory_counts_at_least_the_float32_vectors_each_item_keeps():
    out = replica_memory(n=4000, kinds=("flat",), d=64)
    flat = out["kinds"]["flat"]
    # Every item keeps its float32 vector (256 B at d=64) and an item record (~1 KB as Python objects).
    assert 64 * 4 < flat["bytes_per_item"] < 20_000
    assert flat["recall_at_10"] == 1.0
    gb = flat["gb_at"]
    assert abs(gb["10,000,000"] - 10 * gb["1,000,000"]) < 0.02  # the stated rule: linear in N
