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
