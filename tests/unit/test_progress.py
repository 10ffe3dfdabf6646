"""simserver.progress: a training's progress, throttled into the store, answered with the job's end."""

from __future__ import annotations

import io
import zipfile

import pytest

from simserver.errors import RequestRefused
from simserver.jobs import JobRecords
from simserver.progress import (
    ProgressTracker,
    answer,
    read_progress,
    store_writer,
    training_progress,
    zip_entries,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tracker_throttles_writes_but_never_a_stage_change():
    clock, written = Clock(), []
    t = ProgressTracker(written.append, clock=clock, min_interval=0.5)
    t.stage("encoding", 10)
    for _ in range(4):  # four advances within 0.3 s: no write
        clock.now += 0.1
        t.advance(1)
    assert [w["stage"] for w in written] == ["encoding"] and written[-1]["done"] == 0
    clock.now += 0.3
    t.advance(1)  # 0.7 s after the last write
    assert written[-1]["done"] == 5 and written[-1]["total"] == 10
    t.stage("training")  # at once, whatever the interval
    assert written[-1]["stage"] == "training" and written[-1]["done"] == 0
    t.advance(3)
    t.stage("training")  # announced again by a caller that cannot tell: the count goes on
    assert t.record["done"] == 3 and len(written) == 3
    with pytest.raises(ValueError, match="unknown stage"):
        t.stage("cooking")


def test_tracker_grows_a_total_it_overshoots_and_survives_a_failing_store():
    def broken(record: dict) -> None:
        raise OSError("store down")

    t = ProgressTracker(broken, clock=Clock())
    t.stage("encoding", 2)  # the write fails: logged, the training goes on
    t.advance(3)
    assert t.record["done"] == 3 and t.record["total"] == 3


def test_answer_eta_from_the_stage_rate_and_the_job_end():
    job = {"status": "in_progress", "created_at": "2026-01-01T00:00:00+00:00"}
    p = {
        "stage": "encoding",
        "done": 20,
        "total": 100,
        "started_at": 0.0,
        "stage_started_at": 10.0,
        "updated_at": 20.0,
    }
    # 20 images in 10 s: 80 left take 40 s from the last update, 2 s of which have passed.
    assert answer(job, p, now=22.0) == {
        "stage": "encoding",
        "done": 20,
        "total": 100,
        "seconds": 22.0,
        "eta_seconds": 38.0,
    }
    assert answer(job, {**p, "done": 0}, now=22.0)["eta_seconds"] is None  # no rate yet
    assert answer(job, None, now=job_epoch(job) + 3)["stage"] == "reading"  # the upload is still read
    assert answer(job, None, now=job_epoch(job) + 3)["seconds"] == 3.0
    done = answer({"status": "completed"}, {**p, "stage": "publishing", "total": 0, "done": 0}, now=99.0)
    assert done == {"stage": "done", "done": 0, "total": 0, "seconds": 20.0, "eta_seconds": 0.0}
    failed = answer({"status": "failed", "error": "no usable image"}, p, now=99.0)
    assert (
        failed["stage"] == "failed" and failed["error"] == "no usable image" and failed["eta_seconds"] is None
    )


def job_epoch(job: dict) -> float:
    from datetime import datetime

    return datetime.fromisoformat(job["created_at"]).timestamp()


def test_training_progress_reads_the_store(store):
    jobs = JobRecords(store)
    record = jobs.started("task-1", "shop")
    store_writer(store, "task-1")({"stage": "training", "done": 4, "total": 0, "started_at": 1.0})
    assert read_progress(store, "task-1")["stage"] == "training"
    assert training_progress(store, "shop", "task-1")["stage"] == "training"
    jobs.completed(record, {"version": "v1"})
    assert training_progress(store, "shop", "task-1")["stage"] == "done"
    with pytest.raises(RequestRefused, match="unknown task") as e:
        training_progress(store, "other-domain", "task-1")  # a task of another domain
    assert e.value.status == 404
    with pytest.raises(RequestRefused, match="not a task id") as e:
        training_progress(store, "shop", "../jobs/x")
    assert e.value.status == 400


def test_zip_entries():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/", "")
        zf.writestr("a/1.png", b"x")
        zf.writestr("b/2.png", b"y")
    assert zip_entries(buf.getvalue()) == 2 and zip_entries(b"not a zip") == 0
