"""Adaptive batching: concurrent callers' rows run through a model together.

There is no timer: a call that finds the model idle runs at once, alone, so a lone request pays no
added latency. Calls that arrive while a run is under way queue up and go together in the next
run (up to ``max_rows`` rows), so under load the batch grows with the queue. The caller that finds
the model idle runs the batches itself (leader/follower), hence no background thread to manage.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class _Call:
    rows: np.ndarray
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class BatchStats:
    """Counts per run: how many calls and rows went together (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs = 0
        self.calls = 0
        self.rows = 0
        self.calls_per_run: Counter[int] = Counter()

    def record(self, calls: int, rows: int) -> None:
        with self._lock:
            self.runs += 1
            self.calls += calls
            self.rows += rows
            self.calls_per_run[calls] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "runs": self.runs,
                "calls": self.calls,
                "rows": self.rows,
                "calls_per_run": {str(k): v for k, v in sorted(self.calls_per_run.items())},
            }


class Batcher:
    """Coalesce concurrent calls of ``fn`` (``[N, ...] -> [N, ...]``, row for row; one run at a time)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_rows: int = 64) -> None:
        self.fn = fn
        self.max_rows = max_rows
        self.stats = BatchStats()
        self._cv = threading.Condition()
        self._queue: deque[_Call] = deque()
        self._busy = False

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        call = _Call(rows)
        with self._cv:
            self._queue.append(call)
            while not call.done and self._busy:
                self._cv.wait()
            if call.done:
                return self._result(call)
            self._busy = True
        batch: list[_Call] = []
        try:
            # Leader: run queued calls in arrival order until our own is done; every call queued
            # before ours is served first, those after it by the next leader.
            while not call.done:
                with self._cv:
                    batch = self._take()
                self._run(batch)
        finally:
            with self._cv:
                for c in batch:  # taken, then interrupted before finishing (e.g. KeyboardInterrupt)
                    if not c.done:
                        c.error, c.done = RuntimeError("encoding was interrupted"), True
                self._busy = False
                self._cv.notify_all()
        return self._result(call)

    def _take(self) -> list[_Call]:
        batch = [self._queue.popleft()]
        rows = len(batch[0].rows)
        while self._queue and rows + len(self._queue[0].rows) <= self.max_rows:
            rows += len(self._queue[0].rows)
            batch.append(self._queue.popleft())
        return batch

    def _run(self, batch: list[_Call]) -> None:
        sizes = [len(c.rows) for c in batch]
        try:
            self.stats.record(len(batch), sum(sizes))
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([c.rows for c in batch])
            out = self.fn(rows)
            parts = np.split(out, np.cumsum(sizes)[:-1])
        except BaseException as exc:  # every call of the failed run gets the error
            with self._cv:
                for c in batch:
                    c.error, c.done = exc, True
                self._cv.notify_all()
            return
        with self._cv:
            for c, part in zip(batch, parts, strict=True):
                c.result, c.done = part, True
            self._cv.notify_all()

    @staticmethod
    def _result(call: _Call) -> np.ndarray:
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result
