"""How many CPUs this process may use, and how FAISS's OpenMP threads use them."""

from __future__ import annotations

import os

# Beyond this many query rows FAISS splits a search over threads; below it one thread is faster.
PARALLEL_QUERIES = 16


def usable_cpus() -> int:
    """CPUs this process may run on (a container's affinity, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def faiss_threads(rows: int) -> None:
    """Set the calling thread's OpenMP threads for a FAISS call over ``rows`` vectors.

    A single query gains nothing from threads and wastes CPU: on 2 cores one query against a
    10k-vector Flat index measured 5.8 ms wall and 13 ms CPU on 2 threads against 3.3 ms and 3.3 ms
    on one (the threads split one scan and then spin). Searches run concurrently on the service's
    own threads instead; batches (relevance, recall checks, builds) use every CPU.
    """
    import faiss

    faiss.omp_set_num_threads(1 if rows < PARALLEL_QUERIES else usable_cpus())
