"""How many CPUs this process may use, and how FAISS's OpenMP threads use them."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

# Beyond this many query rows FAISS splits a search over threads; below it one thread is faster.
PARALLEL_QUERIES = 16


@functools.cache
def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a container's CPU quota (Docker
    ``--cpus``, a Kubernetes limit, an ECS task's CPU), which the affinity mask does not show.
    Read once per process: every batch search asks, and neither changes while it runs."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(n, quota) if quota else n)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup's CPU limit rounded up to whole CPUs (v2 ``cpu.max``, else v1 CFS), None if unlimited."""
    try:
        max_quota, max_period = (root / "cpu.max").read_text().split()[:2]
        return None if max_quota == "max" else max(1, math.ceil(int(max_quota) / int(max_period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def faiss_threads(rows: int) -> None:
    """Set the calling thread's OpenMP threads for a FAISS call over ``rows`` vectors.

    A single query gains nothing from threads and wastes CPU: on 2 cores one query against a
    10k-vector Flat index measured 5.8 ms wall and 13 ms CPU on 2 threads against 3.3 ms and 3.3 ms
    on one (the threads split one scan and then spin). Searches run concurrently on the service's
    own threads instead; batches (relevance, recall checks, builds) use every CPU.
    """
    import faiss

    faiss.omp_set_num_threads(1 if rows < PARALLEL_QUERIES else usable_cpus())
