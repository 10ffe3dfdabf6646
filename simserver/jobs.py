"""Training-job records in the artifact store, so any replica can answer a job's status.

BentoML keeps task results in a per-container SQLite file that is wiped on start; behind a load
balancer, ``/train/status`` often lands on another replica. Each job therefore also writes
``jobs/<task_id>.json`` (in progress, then completed with its result or failed with its error).

Finished records are kept ``JOB_RETENTION_DAYS`` (then deleted with their progress snapshot by
:meth:`JobRecords.prune`, which every gateway runs at start-up and every ``PRUNE_EVERY_SECONDS``).

A running job's record carries a heartbeat, renewed every ``HEARTBEAT_SECONDS``: a record still in
progress whose heartbeat stopped (its server was killed, so nothing wrote "failed") is answered as
failed, "interrupted", instead of leaving clients polling for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import psutil
from pydantic import BaseModel

from simserver.http_errors import refusal
from simserver.store import ArtifactStore

R = TypeVar("R", bound=BaseModel)

logger = logging.getLogger(__name__)

TASK_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"  # BentoML's ids are hex; this names a store object
_TASK_ID = re.compile(TASK_ID_PATTERN)
HEARTBEAT_SECONDS = 30.0
# Missed heartbeats before an in-progress record counts as interrupted (store latency, GC pauses).
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS
PRUNE_EVERY_SECONDS = 6 * 3600.0


def checked_task_id(task_id: str) -> str:
    """``task_id`` if it can name a store object (BentoML's ids can), else ValueError."""
    if not _TASK_ID.match(task_id):
        raise ValueError(f"invalid task id {task_id!r}")
    return task_id


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def this_process() -> dict[str, Any]:
    """Who runs a job: host, pid and the pid's start time (a pid alone may be reused)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _gone(owner: Any) -> bool:
    """True if ``owner`` (from :func:`this_process`) was a process of this host that no longer runs."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False  # another replica's: its heartbeat tells
    try:
        return abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["started"])) > 1.0
    except psutil.NoSuchProcess:
        return True
    except (KeyError, TypeError, ValueError, psutil.Error):
        return False


class JobRecords:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    @staticmethod
    def _key(task_id: str) -> str:
        return f"jobs/{checked_task_id(task_id)}.json"

    def _write(self, task_id: str, record: dict[str, Any]) -> None:
        try:
            self.store.put(self._key(task_id), json.dumps(record).encode())
        except Exception:  # the job itself must not fail because its record could not be written
            logger.exception("cannot write job record %s", task_id)

    def started(self, task_id: str, domain: str, kind: str = "train") -> dict[str, Any]:
        record = {
            "task_id": task_id,
            "domain": domain,
            "kind": kind,
            "status": "in_progress",
            "created_at": _now(),
            "executed_at": None,
            "heartbeat_at": _now(),
            "owner": this_process(),
        }
        self._write(task_id, record)
        return record

    async def _beat(self, record: dict[str, Any]) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            record["heartbeat_at"] = _now()
            await anyio.to_thread.run_sync(self._write, record["task_id"], dict(record))

    @staticmethod
    def interrupted(record: dict[str, Any], now: datetime | None = None) -> bool:
        """In progress, but its heartbeat stopped: the server running it is gone."""
        if record.get("status") != "in_progress":
            return False
        last = record.get("heartbeat_at") or record.get("created_at")
        try:
            age = ((now or datetime.now(UTC)) - datetime.fromisoformat(str(last))).total_seconds()
        except ValueError:
            return False
        return age > STALE_AFTER_SECONDS

    def completed(self, record: dict[str, Any], result: dict[str, Any]) -> None:
        self._write(
            record["task_id"], {**record, "status": "completed", "executed_at": _now(), "result": result}
        )

    def failed(self, record: dict[str, Any], http_status: int, error: str) -> None:
        self._write(
            record["task_id"],
            {**record, "status": "failed", "executed_at": _now(), "http_status": http_status, "error": error},
        )

    async def run(
        self, task_id: str | None, domain: str, work: Callable[[], Awaitable[R]], kind: str = "train"
    ) -> R:
        """``await work()``, recorded as job ``task_id`` (in progress, then completed or failed
        with the status and message the client gets). No record without a task id. ``kind``: the
        task's route (``train``, ``duplicates``): BentoML's task ids are shared by every task."""
        if not task_id:
            return await work()
        record = await anyio.to_thread.run_sync(self.started, task_id, domain, kind)
        beat = asyncio.ensure_future(self._beat(record))
        try:
            result = await work()
        except BaseException as exc:  # cancellation too (a shutdown): no record stays in_progress
            if isinstance(exc, Exception):
                status, message = refusal(exc) or (500, f"internal error: {type(exc).__name__}")
            else:
                status, message = 503, "interrupted: the server stopped during the training; submit it again"
            with anyio.CancelScope(shield=True):
                await self._stop(beat)
                await anyio.to_thread.run_sync(self.failed, record, status, message)
            raise
        await self._stop(beat)
        await anyio.to_thread.run_sync(self.completed, record, result.model_dump(mode="json"))
        return result

    @staticmethod
    async def _stop(beat: asyncio.Future) -> None:
        """Stop the heartbeat, and wait for a write in flight, so the final record is written last."""
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat

    def fail_interrupted(self) -> list[str]:
        """At start-up: the jobs a dead process of this host left in progress are marked failed
        at once (a client polling one sees the failure now, not after the heartbeat goes stale)."""
        failed = []
        for key in self.store.list("jobs/"):
            task_id = key.removeprefix("jobs/").removesuffix(".json")
            try:
                record = json.loads(self.store.get(key))
            except (KeyError, ValueError):
                continue
            if record.get("status") == "in_progress" and _gone(record.get("owner")):
                self.failed(record, 503, "interrupted by a restart of the server; submit it again")
                failed.append(task_id)
        if failed:
            logger.info("marked %d interrupted training jobs failed: %s", len(failed), ", ".join(failed))
        return failed

    def prune(self, older_than_days: float, now: datetime | None = None) -> list[str]:
        """Delete the records (and progress snapshots) of tasks that finished more than
        ``older_than_days`` ago. Running, unreadable or undated records are left alone. Safe on
        several replicas at once: deleting what another replica deleted is a no-op."""
        from simserver.progress import progress_key

        now = now or datetime.now(UTC)
        pruned = []
        for key in self.store.list("jobs/"):
            task_id = key.removeprefix("jobs/").removesuffix(".json")
            try:
                record = json.loads(self.store.get(key))
                finished = datetime.fromisoformat(str(record["executed_at"]))
            except (KeyError, ValueError, TypeError):
                continue
            age = (now - finished).total_seconds()
            if record.get("status") == "in_progress" or age < older_than_days * 86400:
                continue
            self.store.delete(progress_key(task_id))
            self.store.delete(key)  # the record last: a prune cut short is done again next time
            pruned.append(task_id)
        if pruned:
            logger.info("deleted %d task records finished over %g days ago", len(pruned), older_than_days)
        return pruned

    def housekeeping(self, retention_days: float) -> None:
        """The gateway's background thread: interrupted jobs failed at once, then old records
        pruned now and every ``PRUNE_EVERY_SECONDS``. A failure is logged, never fatal."""
        try:
            self.fail_interrupted()
        except Exception:
            logger.exception("cannot check for interrupted jobs")
        while True:
            try:
                self.prune(retention_days)
            except Exception:
                logger.exception("cannot prune old task records")
            time.sleep(PRUNE_EVERY_SECONDS)

    def get(self, task_id: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self.store.get(self._key(task_id)))
        except (KeyError, ValueError):
            return None
        if self.interrupted(record):
            return {
                **record,
                "status": "failed",
                "http_status": 503,
                "error": "interrupted: the server running this training stopped (no heartbeat for "
                f"{STALE_AFTER_SECONDS:.0f} s); submit it again",
            }
        return record

    @staticmethod
    def status_json(record: dict[str, Any]) -> dict[str, Any]:
        """The shape of BentoML's own ``/status`` answer."""
        return {k: record.get(k) for k in ("task_id", "status", "created_at", "executed_at")}

    @staticmethod
    def result_response(record: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) that BentoML's own ``/get`` would give."""
        if record["status"] == "completed":
            return 200, record["result"]
        if record["status"] == "failed":
            return int(record.get("http_status", 500)), {"error": record.get("error", "failed")}
        return 400, {"error": f"task {record['task_id']} is not completed yet"}
