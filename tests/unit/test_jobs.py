"""simserver.jobs: every training ends with a record any replica can answer from, whatever ended it."""

from __future__ import annotations

import anyio
import pytest

from simserver.errors import BadArchive
from simserver.jobs import JobRecords
from simserver.schemas import TrainReply

REPLY = TrainReply(version="v1", indexed=1, skipped=[], labels={"a": 1}, seconds=0.1)


def test_run_records_completed_failed_and_interrupted(store):
    jobs = JobRecords(store)

    async def ok() -> TrainReply:
        assert jobs.get("t1")["status"] == "in_progress"  # written before the work starts
        return REPLY

    assert anyio.run(jobs.run, "t1", "shop", ok) == REPLY
    assert jobs.get("t1")["status"] == "completed" and jobs.get("t1")["result"]["version"] == "v1"

    async def refused() -> TrainReply:
        raise BadArchive("not a zip archive")

    with pytest.raises(BadArchive):
        anyio.run(jobs.run, "t2", "shop", refused)
    assert JobRecords.result_response(jobs.get("t2")) == (400, {"error": "not a zip archive"})

    async def crashed() -> TrainReply:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        anyio.run(jobs.run, "t3", "shop", crashed)
    assert JobRecords.result_response(jobs.get("t3")) == (500, {"error": "internal error: RuntimeError"})

    async def stopped() -> None:
        with anyio.move_on_after(0.05):  # a shutdown cancels the training mid-way
            await jobs.run("t4", "shop", lambda: anyio.sleep(10))

    anyio.run(stopped)
    status, body = JobRecords.result_response(jobs.get("t4"))
    assert status == 503 and "interrupted" in body["error"]


def test_no_record_without_a_task_id(store):
    async def ok() -> TrainReply:
        return REPLY

    assert anyio.run(JobRecords(store).run, None, "shop", ok) == REPLY
    assert store.list("jobs") == []


def test_a_record_whose_heartbeat_stopped_reads_as_interrupted(store, monkeypatch):
    """A server killed mid-training writes no "failed": its record must not stay in_progress."""
    import json
    from datetime import UTC, datetime, timedelta

    import simserver.jobs as jobs_module

    jobs = JobRecords(store)
    record = jobs.started("t5", "shop")
    assert jobs.get("t5")["status"] == "in_progress"
    later = datetime.now(UTC) + timedelta(seconds=jobs_module.STALE_AFTER_SECONDS + 1)
    assert JobRecords.interrupted(record, now=later)
    stale = {**record, "heartbeat_at": (datetime.now(UTC) - timedelta(seconds=600)).isoformat()}
    store.put("jobs/t5.json", json.dumps(stale).encode())
    got = jobs.get("t5")
    assert got["status"] == "failed" and JobRecords.result_response(got)[0] == 503
    assert "interrupted" in got["error"]


def test_a_running_job_renews_its_heartbeat(store, monkeypatch):
    import json

    import simserver.jobs as jobs_module

    monkeypatch.setattr(jobs_module, "HEARTBEAT_SECONDS", 0.05)
    writes: list[str] = []
    real_put = store.put

    def put(key: str, data: bytes) -> None:
        writes.append(json.loads(data)["status"])
        real_put(key, data)

    monkeypatch.setattr(store, "put", put)
    jobs = JobRecords(store)

    async def slow() -> TrainReply:
        await anyio.sleep(0.3)
        return REPLY

    anyio.run(jobs.run, "t6", "shop", slow)
    # started, then heartbeats while it ran, then the final record, written last
    assert writes[0] == "in_progress" and writes.count("in_progress") >= 4 and writes[-1] == "completed"
    assert jobs.get("t6")["status"] == "completed"


def test_at_start_up_jobs_of_dead_processes_of_this_host_are_failed_at_once(store):
    import json
    import subprocess
    import sys

    from simserver.jobs import this_process

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = this_process()
    owners = {
        "dead": {**me, "pid": dead.pid},  # its process is gone
        "reused": {**me, "started": me["started"] - 3600},  # the pid now belongs to another process
        "alive": me,  # this process: still running it
        "elsewhere": {**me, "host": "another-replica"},  # its heartbeat decides
        "old-format": None,
    }
    jobs = JobRecords(store)
    for task_id, owner in owners.items():
        record = jobs.started(task_id, "fashion")
        record["owner"] = owner
        store.put(f"jobs/{task_id}.json", json.dumps(record).encode())
    jobs.completed(jobs.started("done", "fashion"), {"version": "v"})
    assert sorted(jobs.fail_interrupted()) == ["dead", "reused"]
    for task_id in ("dead", "reused"):
        record = jobs.get(task_id)
        assert record["status"] == "failed" and record["http_status"] == 503
        assert "interrupted by a restart" in record["error"]
    assert [jobs.get(t)["status"] for t in ("alive", "elsewhere", "old-format", "done")] == [
        "in_progress",
        "in_progress",
        "in_progress",
        "completed",
    ]


def test_prune_deletes_old_finished_records_and_their_progress_only(store):
    import json
    from datetime import UTC, datetime, timedelta

    from simserver.progress import progress_key

    jobs = JobRecords(store)
    now = datetime(2026, 12, 1, tzinfo=UTC)

    def record(task_id: str, status: str, days_ago: float | None) -> None:
        finished = None if days_ago is None else (now - timedelta(days=days_ago)).isoformat()
        body = {"task_id": task_id, "status": status, "executed_at": finished}
        store.put(f"jobs/{task_id}.json", json.dumps(body).encode())
        store.put(progress_key(task_id), b'{"stage": "done"}')

    record("old-done", "completed", 8)
    record("old-failed", "failed", 30)
    record("recent", "completed", 6.9)
    record("running", "in_progress", None)
    record("odd-date", "completed", None)
    store.put("jobs/garbled.json", b"not json")

    assert sorted(jobs.prune(7, now=now)) == ["old-done", "old-failed"]
    left = store.list("jobs/")
    assert left == sorted(f"jobs/{t}.json" for t in ("recent", "running", "odd-date", "garbled"))
    assert store.list("progress/") == sorted(progress_key(t) for t in ("recent", "running", "odd-date"))
    assert jobs.prune(7, now=now) == []  # nothing more; deleting twice (another replica) is harmless
    assert jobs.prune(1, now=now) == ["recent"]
