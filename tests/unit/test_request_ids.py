"""simserver.request_ids: one id per request, in the log lines of every service it reaches."""

from __future__ import annotations

import logging

from opentelemetry import baggage
from opentelemetry import context as otel_context

from simserver import request_ids


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("x", logging.INFO, __file__, 1, msg, None, None)


def test_the_prefix_is_added_even_when_bentoml_set_its_own_request_id_attribute():
    tokens = request_ids.bind("abc")
    try:
        record = _record("hello")
        record.request_id = "0x5f3a"  # what BentoML's TraceRecordFilter puts there (a span id)
        request_ids.RequestIdFilter().filter(record)
        request_ids.RequestIdFilter().filter(record)  # a second handler: one prefix only
        assert record.getMessage() == "[req abc] hello"
    finally:
        request_ids.unbind(tokens)
    assert request_ids.current_id() is None


def test_an_internal_service_reads_the_id_from_the_baggage_it_received():
    token = otel_context.attach(baggage.set_baggage(request_ids.BAGGAGE_KEY, "gw-1"))
    try:
        assert request_ids.current.get() is None and request_ids.current_id() == "gw-1"
        record = _record("encoding")
        request_ids.RequestIdFilter().filter(record)
        assert record.getMessage() == "[req gw-1] encoding"
    finally:
        otel_context.detach(token)
    bad = otel_context.attach(baggage.set_baggage(request_ids.BAGGAGE_KEY, "x\ninjected line"))
    try:
        assert request_ids.current_id() is None  # not a safe token: not written to the log
    finally:
        otel_context.detach(bad)


def test_the_id_joins_the_clients_baggage_and_replaces_a_forged_one():
    headers = [
        (b"baggage", b"tenant=a, simserver.request_id=forged"),
        (b"baggage", b"ignored=1"),
        (b"host", b"h"),
    ]
    out = request_ids.with_baggage(headers, "r1")
    assert [v for k, v in out if k == b"baggage"] == [b"tenant=a,simserver.request_id=r1"]
    assert (b"host", b"h") in out
    assert request_ids.with_baggage([], "r2") == [(b"baggage", b"simserver.request_id=r2")]


def test_the_baggage_header_names_the_id_an_internal_service_logs():
    import asyncio

    seen: list[str | None] = []

    async def app(scope, receive, send):
        seen.append(request_ids.current_id())

    mw = request_ids.BaggageIdMiddleware(app)

    def call(*headers: tuple[bytes, bytes]) -> str | None:
        asyncio.run(mw({"type": "http", "headers": list(headers)}, None, None))
        return seen.pop()

    # What the gateway's calls carry: BentoML's client serializes the current baggage, ours among others.
    assert call((b"baggage", b"other=1,simserver.request_id=gw-7;prop=x")) == "gw-7"
    assert call((b"baggage", b"other=1"), (b"Baggage", b"simserver.request_id=gw-8")) == "gw-8"
    assert call((b"baggage", b"simserver.request_id=bad%0Aline")) is None  # not a safe token
    assert call() is None
    assert request_ids.current.get() is None  # nothing left behind after the request
    # One after the other, each request its own id (a kept-alive connection once repeated the first).
    assert [call((b"baggage", f"simserver.request_id=r{i}".encode())) for i in range(3)] == ["r0", "r1", "r2"]
