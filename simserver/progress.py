"""A training's progress (stage, images done / total, seconds, ETA), readable from any replica.

The trainer writes ``progress/<task_id>.json`` in the artifact store as it goes (at most every
``MIN_INTERVAL`` seconds, and at every change of stage); ``GET /{domain}/train/progress`` reads it
together with the job record (:mod:`simserver.jobs`), which says whether the task is finished:
a completed job is ``done``, a failed one ``failed``, whatever the last progress record said.

Stages, in order: ``reading`` (the upload and the zip), ``encoding`` (backbone features of every
image), ``training`` (augmented views, the head's fit), ``evaluating`` (hold-out, calibration),
``indexing`` (exporting the encoder, the FAISS index, the images), ``publishing`` (the pointer
moves, the index services reload), then ``done`` or ``failed``. ``done`` / ``total`` count the
current stage's images; ``total`` is 0 where a stage has no count known in advance.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, get_args

from simserver.jobs import checked_task_id
from simserver.schemas import TrainingStage
from simserver.store import ArtifactStore

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = get_args(TrainingStage)
# Writes while images stream by: often enough for a progress bar, rare enough for S3.
MIN_INTERVAL = 0.5

StageFn = Callable[[str, int], None]


def progress_key(task_id: str) -> str:
    return f"progress/{checked_task_id(task_id)}.json"


class ProgressTracker:
    """Counts one task's progress and hands each snapshot to ``write`` (throttled).

    ``stage(name, total)`` starts a stage; ``advance(n)`` is the ``progress`` callback the
    library functions take (images done). Thread-safe: the decode helper thread may report too.
    """

    def __init__(
        self,
        write: Callable[[dict[str, Any]], None],
        clock: Callable[[], float] = time.time,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self._write, self._clock, self._min_interval = write, clock, min_interval
        self._lock = threading.Lock()
        now = clock()
        self.record: dict[str, Any] = {
            "stage": "reading",
            "done": 0,
            "total": 0,
            "started_at": now,
            "stage_started_at": now,
            "updated_at": now,
        }
        self._written = float("-inf")

    def stage(self, name: str, total: int = 0) -> None:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}")
        with self._lock:
            if name == self.record["stage"] and not total:
                return  # the same stage announced again (by a caller that cannot tell): go on counting
            now = self._clock()
            self.record.update(
                stage=name, done=0, total=max(0, int(total)), stage_started_at=now, updated_at=now
            )
            self._flush(now, force=True)

    def advance(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            done = self.record["done"] + int(n)
            total = self.record["total"]
            # A count past the announced total (views after images) grows the total, never overflows it.
            self.record.update(done=done, total=max(total, done) if total else 0, updated_at=now)
            self._flush(now, force=False)

    def _flush(self, now: float, force: bool) -> None:
        if not force and now - self._written < self._min_interval:
            return
        self._written = now
        try:
            self._write(dict(self.record))
        except Exception:  # a training must not fail because its progress could not be written
            logger.exception("cannot write the training's progress")


def store_writer(store: ArtifactStore, task_id: str) -> Callable[[dict[str, Any]], None]:
    key = progress_key(task_id)

    def write(record: dict[str, Any]) -> None:
        store.put(key, json.dumps(record).encode())

    return write


def tracker_for(store: ArtifactStore, task_id: str | None) -> ProgressTracker | None:
    """A tracker writing ``task_id``'s record to ``store``; None without a task id (a direct call)."""
    if not task_id:
        return None
    tracker = ProgressTracker(store_writer(store, task_id))
    tracker.stage("reading")
    return tracker


def read_progress(store: ArtifactStore, task_id: str) -> dict[str, Any] | None:
    try:
        record = json.loads(store.get(progress_key(task_id)))
    except (KeyError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def answer(job: dict[str, Any], progress: dict[str, Any] | None, now: float | None = None) -> dict[str, Any]:
    """The ``/train/progress`` reply from a job record (:mod:`simserver.jobs`) and the last
    progress record (None before the trainer wrote one: the upload is still being read).

    ``seconds``: since the trainer started (to the end, once finished); ``eta_seconds``: the
    current stage's remaining time at its rate so far (None while that cannot be told)."""
    now = time.time() if now is None else now
    p = progress or {}
    started = float(p.get("started_at", _epoch(job.get("created_at")) or now))
    done, total = int(p.get("done", 0)), int(p.get("total", 0))
    status = job.get("status")
    if status in ("completed", "failed"):
        stage = "done" if status == "completed" else "failed"
        ended = float(p.get("updated_at", now))
        reply: dict[str, Any] = {
            "stage": stage,
            "done": total if stage == "done" else done,
            "total": total,
            "seconds": round(max(0.0, ended - started), 3),
            "eta_seconds": 0.0 if stage == "done" else None,
        }
        if stage == "failed":
            reply["error"] = job.get("error")
        return reply
    eta = None
    stage_started, updated = float(p.get("stage_started_at", now)), float(p.get("updated_at", now))
    if total and done and updated > stage_started:
        rate = done / (updated - stage_started)
        eta = round(max(0.0, (total - done) / rate - (now - updated)), 1)
    return {
        "stage": p.get("stage", "reading"),
        "done": done,
        "total": total,
        "seconds": round(max(0.0, now - started), 3),
        "eta_seconds": eta,
    }


def _epoch(iso: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def zip_entries(data: bytes) -> int:
    """Files in a zip, for the ``reading`` stage's total (0 if it is no zip: reading says why)."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return sum(1 for i in zf.infolist() if not i.is_dir())
    except (zipfile.BadZipFile, OSError, ValueError):
        return 0


def training_progress(store: ArtifactStore, domain: str, task_id: str) -> dict[str, Any]:
    """``GET /{domain}/train/progress``: 404 for a task this domain's store has no record of."""
    from simserver.errors import RequestRefused
    from simserver.jobs import JobRecords

    try:
        checked_task_id(task_id)
    except ValueError:
        raise RequestRefused(f"task_id: {task_id[:80]!r} is not a task id", 400) from None
    job = JobRecords(store).get(task_id)
    if job is None or job.get("domain") != domain:
        raise RequestRefused(f"unknown task {task_id!r} of domain {domain!r}", 404)
    return answer(job, read_progress(store, task_id))
