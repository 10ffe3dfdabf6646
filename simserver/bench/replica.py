"""Memory one serving replica needs for one domain, by index kind and catalog size: a version is
published (N clustered synthetic 1280-d vectors, one item record each), then a fresh process loads it
as an index service does at start; its resident memory after the load minus before it (imports
done) is the domain's cost.

The cost is a sum of per-item parts (the float32 vectors every segment keeps for exact re-ranking and
filters, the FAISS structure: codes or graph links of fixed M, the item record), so it is linear in N:
``bytes_per_item`` measured at N predicts 100k, 1M and 10M (the method stated in the output). It does
not depend on how many replicas serve: each replica holds the whole version.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import tempfile
from collections.abc import Sequence

from simserver.bench.common import clustered

logger = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "hnsw_fp16", "ivfpq")
SIZES = (100_000, 1_000_000, 10_000_000)
DOMAIN = "bench-replica"


def _load_version(root: str, version: str, out: mp.Queue) -> None:
    """In a fresh process: the resident bytes the loaded version adds, and its item count. (Not
    the peak: ``ru_maxrss`` survives the fork + exec that starts this process, so it would report
    the parent's.)"""
    import numpy as np
    import psutil

    from simserver.repository import Repository
    from simserver.store import LocalStore

    proc = psutil.Process()
    before = proc.memory_info().rss
    catalog = Repository(LocalStore(root)).load(DOMAIN, version)
    catalog.search(np.ones((1, catalog.dim), np.float32), 10)  # a served version has searched
    out.put((proc.memory_info().rss - before, len(catalog)))


def _items(n: int) -> list:
    from simserver.index import Item

    # Item records like a real catalog's: a path-like name, a label, a content-addressed image key.
    return [
        Item(f"label-{i % 50}/{i:08d}.jpg", f"label-{i % 50}", f"domains/{DOMAIN}/images/{i:064x}.jpg",
             "image/jpeg", {"sku": f"{i:08d}"}, f"sku-{i:08d}", "2026-12-02T00:00:00+00:00")
        for i in range(n)
    ]  # fmt: skip


def _build_version(root: str, kind: str, n: int, d: int, out: mp.Queue) -> None:
    """In a fresh process: build and publish one version of ``kind``. The builder's vectors, items
    and index (~15 GB at 1M for HNSW) are freed with the process, so that the loading process is
    the only big one alive when it is measured, and one kind's build never shares memory with the
    next."""
    from simserver.index import DomainIndex
    from simserver.index_choice import IndexPolicy
    from simserver.repository import Repository
    from simserver.store import LocalStore

    x, _ = clustered(n, d)
    index = DomainIndex.build(
        x,
        _items(n),
        metric="cosine",
        encoder_id="synthetic",
        version=f"{kind}-{n}",
        policy=IndexPolicy(kind=kind),
    )
    Repository(LocalStore(root)).publish(DOMAIN, index)
    meta = index.meta
    out.put({k: meta[k] for k in ("version", "index_kind", "bytes_per_vector", "recall_at_10")})


def _in_process(ctx, target, *args):
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        result = queue.get(timeout=3600)
    finally:
        proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{target.__name__} exited with {proc.exitcode} (out of memory?)")
    return result


def replica_memory(n: int = 100_000, kinds: Sequence[str] = KINDS, d: int = 1280) -> dict:
    out: dict = {
        "n": n,
        "dim": d,
        "vectors": "clustered synthetic (simserver.bench.common.clustered), one item record each",
        "method": "bytes_per_item = (RSS after loading the version - RSS before) / n in a fresh process; "
        "memory at N = bytes_per_item x N (every part is per item); the process itself "
        "(Python, FAISS, NumPy: an index service idles at ~120 MB) is not included",
        "kinds": {},
    }
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-replica-") as tmp:
        for kind in kinds:
            meta = _in_process(ctx, _build_version, tmp, kind, n, d)
            added, count = _in_process(ctx, _load_version, tmp, meta["version"])
            per_item = added / count
            out["kinds"][meta["index_kind"]] = {
                "measured_rss_mb": round(added / 2**20, 1),
                "bytes_per_item": round(per_item),
                "index_bytes_per_vector": meta["bytes_per_vector"],
                "recall_at_10": meta["recall_at_10"],
                "gb_at": {f"{size:,}": round(per_item * size / 1e9, 2) for size in SIZES},
            }
            logger.info("replica memory, %s at N=%d: %.0f MB (%.0f B/item)", kind, n, added / 2**20, per_item)
    return out
