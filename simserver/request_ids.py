"""One id per gateway request: in the ``X-Request-ID`` response header, in every error reply
(``{"error": ..., "request_id": ...}``) and in every log line written while the request runs, so
a client's complaint leads to the server's log lines.

The internal services (encoder, index, trainer) get the id as W3C baggage: BentoML's client
injects the current OpenTelemetry context (ours holds the id) into every call between services as
a ``baggage`` header, and :class:`BaggageIdMiddleware` on each internal service reads it from the
request itself, so their log lines carry the gateway's id too. (Not from the OpenTelemetry context
BentoML's server restores: on a kept-alive connection its log lines showed an earlier request's.)

A client may send its own ``X-Request-ID`` (a load balancer's, for one id end to end); anything
that is not 1-64 characters of ``[A-Za-z0-9._-]`` is replaced, so a header cannot inject text
into the logs.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import baggage
from opentelemetry import context as otel_context

HEADER = b"x-request-id"
_VALID = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
# Set by the gateway's middleware for the duration of one request; worker threads started with
# anyio.to_thread copy the context, so their log lines carry it too.
current: ContextVar[str | None] = ContextVar("request_id", default=None)


BAGGAGE_KEY = "simserver.request_id"


def bind(rid: str) -> tuple[Token[str | None], Any]:
    """Make ``rid`` the current request's id, here and in the calls it makes to other services."""
    return current.set(rid), otel_context.attach(baggage.set_baggage(BAGGAGE_KEY, rid))


def unbind(tokens: tuple[Token[str | None], Any]) -> None:
    otel_context.detach(tokens[1])
    current.reset(tokens[0])


def with_baggage(headers: list[tuple[bytes, bytes]], rid: str) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``rid`` in the W3C ``baggage`` header: merged into the client's first one
    (the only one OpenTelemetry reads), any id of ours the client put there replaced."""
    theirs = next((v for k, v in headers if k.lower() == b"baggage"), b"")
    mine = BAGGAGE_KEY.encode() + b"="
    entries = [e for e in theirs.split(b",") if e.strip() and not e.strip().startswith(mine)]
    value = b",".join([*entries, mine + rid.encode()])
    return [*((k, v) for k, v in headers if k.lower() != b"baggage"), (b"baggage", value)]


def current_id() -> str | None:
    """This request's id: set by the gateway, or received from it as baggage (checked again: a
    caller of an internal service could send any baggage)."""
    if (rid := current.get()) is not None:
        return rid
    got = baggage.get_baggage(BAGGAGE_KEY)
    return got if isinstance(got, str) and _VALID.match(got.encode()) else None


def from_baggage(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Our id in a request's W3C ``baggage`` header, if there is a valid one."""
    mine = BAGGAGE_KEY.encode() + b"="
    for key, value in headers:
        if key.lower() != b"baggage":
            continue
        for entry in value.split(b","):
            entry = entry.strip().split(b";", 1)[0]  # an entry may carry ;properties
            if entry.startswith(mine) and _VALID.match(got := entry[len(mine) :].strip()):
                return got.decode()
    return None


class BaggageIdMiddleware:
    """On an internal service: the gateway's request id, from the request's baggage header, is
    the current id while the request runs (log lines written in its worker threads included)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        rid = from_baggage(scope.get("headers") or []) if scope["type"] == "http" else None
        if rid is None:
            await self.app(scope, receive, send)
            return
        token = current.set(rid)
        try:
            await self.app(scope, receive, send)
        finally:
            current.reset(token)


def from_header(value: bytes | None) -> str:
    """The client's id if it is a safe token, else a new random one."""
    if value and _VALID.match(value):
        return value.decode()
    return uuid.uuid4().hex[:16]


class RequestIdFilter(logging.Filter):
    """Prefixes each record written during a request with ``[req <id>]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current_id()
        # Not `request_id`: BentoML's own log filter sets that attribute (to a span id) first.
        if rid is not None and not getattr(record, "simserver_request_id", None):
            record.simserver_request_id = rid
            record.msg = f"[req {rid}] {record.msg}"
        return True


def install_log_filter() -> None:
    """On every handler of the root and ``bentoml`` loggers (BentoML configures its own): a filter
    on a handler sees the records of every logger that reaches it."""
    for name in ("", "bentoml"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
                handler.addFilter(RequestIdFilter())
