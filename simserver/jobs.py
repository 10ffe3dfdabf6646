"""Training-job records in the artifact store, so any replica can answer a job's status.

BentoML keeps task results in a per-container SQLite file that is wiped on start; behind a load
balancer, ``/train/status`` often lands on another replica. Each job therefore also writes
``jobs/<task_id>.json`` (in progress, then completed with its result or failed with its error).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel

from simserver.http_errors import refusal
from simserver.store import ArtifactStore

R = TypeVar("R", bound=BaseModel)

logger = logging.getLogger(__name__)

_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobRecords:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    @staticmethod
    def _key(task_id: str) -> str:
        if not _TASK_ID.match(task_id):
            raise ValueError(f"invalid task id {task_id!r}")
        return f"jobs/{task_id}.json"

    def _write(self, task_id: str, record: dict[str, Any]) -> None:
        try:
            self.store.put(self._key(task_id), json.dumps(record).encode())
        except Exception:  # the job itself must not fail because its record could not be written
            logger.exception("cannot write job record %s", task_id)

    def started(self, task_id: str, domain: str) -> dict[str, Any]:
        record = {
            "task_id": task_id,
            "domain": domain,
            "status": "in_progress",
            "created_at": _now(),
            "executed_at": None,
        }
        self._write(task_id, record)
        return record

    def completed(self, record: dict[str, Any], result: dict[str, Any]) -> None:
        self._write(
            record["task_id"], {**record, "status": "completed", "executed_at": _now(), "result": result}
        )

    def failed(self, record: dict[str, Any], http_status: int, error: str) -> None:
        self._write(
            record["task_id"],
            {**record, "status": "failed", "executed_at": _now(), "http_status": http_status, "error": error},
        )

    async def run(self, task_id: str | None, domain: str, work: Callable[[], Awaitable[R]]) -> R:
        """``await work()``, recorded as job ``task_id`` (in progress, then completed or failed
        with the status and message the client gets). No record without a task id."""
        if not task_id:
            return await work()
        record = await anyio.to_thread.run_sync(self.started, task_id, domain)
        try:
            result = await work()
        except BaseException as exc:  # cancellation too (a shutdown): no record stays in_progress
            if isinstance(exc, Exception):
                status, message = refusal(exc) or (500, f"internal error: {type(exc).__name__}")
            else:
                status, message = 503, "interrupted: the server stopped during the training; submit it again"
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.failed, record, status, message)
            raise
        await anyio.to_thread.run_sync(self.completed, record, result.model_dump(mode="json"))
        return result

    def get(self, task_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.get(self._key(task_id)))
        except (KeyError, ValueError):
            return None

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
