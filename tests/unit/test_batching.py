"""Adaptive batching: concurrent calls share runs, each caller gets its own rows back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from simserver.batching import Batcher


class Gate:
    """A model whose first run blocks until released, so later calls queue up deterministically."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.seen: list[int] = []

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.seen.append(len(rows))
        if len(self.seen) == 1:
            self.started.set()
            assert self.release.wait(10)
        if np.any(rows < 0):
            raise ValueError("negative input")
        return rows * 10


def wait_queued(batcher: Batcher, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(batcher._queue) < n:
        assert time.monotonic() < deadline, "calls did not queue"
        time.sleep(0.005)


def test_lone_call_runs_at_once():
    batcher = Batcher(lambda rows: rows + 1)
    out = batcher(np.array([[1.0], [2.0]]))
    np.testing.assert_array_equal(out, [[2.0], [3.0]])
    assert batcher.stats.snapshot() == {"runs": 1, "calls": 1, "rows": 2, "calls_per_run": {"1": 1}}


def test_calls_arriving_during_a_run_go_together_and_get_their_own_rows():
    gate = Gate()
    batcher = Batcher(gate)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(batcher, np.array([[0]]))
        assert gate.started.wait(10)
        later = [pool.submit(batcher, np.arange(i, i + i + 1)[:, None]) for i in range(1, 6)]
        wait_queued(batcher, 5)
        gate.release.set()
        assert first.result(10).tolist() == [[0]]
        for i, f in enumerate(later, start=1):
            assert f.result(10)[:, 0].tolist() == [10 * v for v in range(i, 2 * i + 1)]
    assert gate.seen == [1, 2 + 3 + 4 + 5 + 6]
    stats = batcher.stats.snapshot()
    assert stats["calls_per_run"] == {"1": 1, "5": 1}
    assert stats["calls"] == 6 and stats["runs"] == 2 and stats["rows"] == 21


def test_max_rows_splits_the_queue_into_runs():
    gate = Gate()
    batcher = Batcher(gate, max_rows=4)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(batcher, np.zeros((1, 1)))
        assert gate.started.wait(10)
        later = [pool.submit(batcher, np.full((2, 1), i)) for i in range(1, 6)]
        wait_queued(batcher, 5)
        gate.release.set()
        first.result(10)
        assert [f.result(10)[0, 0] for f in later] == [10, 20, 30, 40, 50]
    assert gate.seen == [1, 4, 4, 2]


def test_a_failed_run_fails_its_calls_only_and_the_batcher_goes_on():
    gate = Gate()
    batcher = Batcher(gate)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(batcher, np.zeros((1, 1)))
        assert gate.started.wait(10)
        bad = pool.submit(batcher, np.full((1, 1), -1))
        wait_queued(batcher, 1)
        gate.release.set()
        first.result(10)
        with pytest.raises(ValueError, match="negative"):
            bad.result(10)
    assert batcher(np.ones((1, 1)))[0, 0] == 10


def test_a_failed_part_returns_only_when_every_interpreter_is_free():
    """A batch is split over interpreters run in parallel; if one part fails, the run must still
    wait for the others, since the next run reuses them (one thread per interpreter at a time)."""
    from simserver.encoder import _TFLiteRunner

    finished: list[int] = []

    class Slow:
        def __call__(self, part: np.ndarray) -> np.ndarray:
            time.sleep(0.3)
            finished.append(len(part))
            return part

    class Bad:
        def __call__(self, part: np.ndarray) -> np.ndarray:
            raise ValueError("bad part")

    runner = object.__new__(_TFLiteRunner)
    runner._wide, runner._narrow = Bad(), [Bad(), Slow(), Slow()]
    runner._helpers = ThreadPoolExecutor(2)
    runner.batcher = Batcher(runner._run)
    with pytest.raises(ValueError, match="bad part"):
        runner(np.zeros((3, 1)))
    assert finished == [1, 1]
    runner._narrow[0] = Slow()
    assert runner(np.arange(3.0)[:, None])[:, 0].tolist() == [0.0, 1.0, 2.0]
