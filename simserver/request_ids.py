"""One id per gateway request: in the ``X-Request-ID`` response header, in every error reply
(``{"error": ..., "request_id": ...}``) and in every log line written while the request runs, so
a client's complaint leads to the server's log lines.

A client may send its own ``X-Request-ID`` (a load balancer's, for one id end to end); anything
that is not 1-64 characters of ``[A-Za-z0-9._-]`` is replaced, so a header cannot inject text
into the logs.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

HEADER = b"x-request-id"
_VALID = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
# Set by the gateway's middleware for the duration of one request; worker threads started with
# anyio.to_thread copy the context, so their log lines carry it too.
current: ContextVar[str | None] = ContextVar("request_id", default=None)


def from_header(value: bytes | None) -> str:
    """The client's id if it is a safe token, else a new random one."""
    if value and _VALID.match(value):
        return value.decode()
    return uuid.uuid4().hex[:16]


class RequestIdFilter(logging.Filter):
    """Prefixes each record written during a request with ``[req <id>]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current.get()
        if rid is not None and not getattr(record, "request_id", None):
            record.request_id = rid
            record.msg = f"[req {rid}] {record.msg}"
        return True


def install_log_filter() -> None:
    """On every handler of the root and ``bentoml`` loggers (BentoML configures its own): a filter
    on a handler sees the records of every logger that reaches it."""
    for name in ("", "bentoml"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
                handler.addFilter(RequestIdFilter())
