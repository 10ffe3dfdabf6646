"""GatewayMiddleware on a stub ASGI app: auth matrix, body limits, error rewriting, job fallback."""

from __future__ import annotations

import asyncio
import json

import pytest

from simserver.asgi import GatewayMiddleware
from simserver.http_errors import error_body


def make_app(status: int = 200, body: object = None):
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])
        raw = json.dumps(body if body is not None else {"ok": True}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    return app, calls


def call(mw, method: str, path: str, headers: dict[str, str] | None = None, query: str = ""):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), dict(start["headers"])


def mw_for(app, **kw):
    opts = {"domains": {"fashion"}, "domain_routes": ("search", "train", "images"), "max_body_bytes": 1000}
    return GatewayMiddleware(app, **{**opts, **kw})


POST = {"Content-Length": "10", "Content-Type": "multipart/form-data; boundary=x"}


@pytest.mark.parametrize(
    ("auth", "status"),
    [
        (None, 401),
        ("Basic abc", 401),
        ("Bearer ", 401),
        ("Bearer wrong", 403),
        ("Bearer k2", 200),
        ("bearer k1", 200),
    ],
)
def test_training_needs_a_key(auth, status):
    app, calls = make_app()
    mw = mw_for(app, api_keys=["k1", "k2"])
    headers = {**POST, **({"Authorization": auth} if auth else {})}
    got, body, _ = call(mw, "POST", "/fashion/train/submit", headers)
    assert got == status
    assert (calls == ["/fashion/train/submit"]) == (status == 200)
    if status != 200:
        assert "key" in body["error"].lower()


def test_reads_open_unless_search_requires_key():
    app, _ = make_app()
    assert call(mw_for(app, api_keys=["k"]), "POST", "/fashion/search", POST)[0] == 200
    strict = mw_for(app, api_keys=["k"], search_requires_key=True)
    assert call(strict, "POST", "/fashion/search", POST)[0] == 401
    assert call(strict, "GET", "/domains")[0] == 401
    assert call(strict, "GET", "/stats")[0] == 401
    assert call(strict, "GET", "/readyz")[0] == 200  # probes stay open for the load balancer
    assert call(strict, "POST", "/fashion/search", {**POST, "Authorization": "Bearer k"})[0] == 200
    assert call(mw_for(app), "POST", "/fashion/train/submit", POST)[0] == 200  # no keys configured


def test_body_limits_and_unknown_domain():
    app, calls = make_app()
    mw = mw_for(app)
    assert call(mw, "POST", "/fashion/search", {"Content-Length": "1001"})[0] == 413
    assert call(mw, "POST", "/fashion/search", {})[0] == 411
    assert call(mw, "POST", "/fashion/search", {"Content-Length": "x"})[0] == 400
    assert (
        call(mw, "POST", "/fashion/search", {"Content-Length": "5", "Content-Type": "multipart/form-data"})[0]
        == 400
    )
    status, body, _ = call(mw, "POST", "/shoes/search", POST)
    assert status == 404 and "shoes" in body["error"]
    assert calls == []


def test_bentoml_error_bodies_are_clarified():
    app, _ = make_app(400, [{"error": "bad thing"}])
    body = call(mw_for(app), "GET", "/x")[1]
    assert body["error"] == "bad thing" and set(body) == {"error", "request_id"}
    detail = {"error": "1 validation error for Input", "detail": [{"loc": ["top_k"], "msg": "too big"}]}
    app, _ = make_app(400, detail)
    assert call(mw_for(app), "GET", "/x")[1]["error"] == "top_k: too big"
    assert error_body({"error": "plain"}) == {"error": "plain"}


def test_unknown_task_answered_from_job_records():
    records = {
        "t1": {
            "task_id": "t1",
            "domain": "fashion",
            "status": "failed",
            "created_at": "c",
            "executed_at": "e",
            "http_status": 413,
            "error": "too big",
        }
    }
    app, _ = make_app(404, {"error": "task_id not found"})
    mw = mw_for(app, job_lookup=records.get)
    status, body, _ = call(mw, "GET", "/fashion/train/status", query="task_id=t1")
    assert status == 200 and body["status"] == "failed"
    status, body, _ = call(mw, "GET", "/fashion/train/get", query="task_id=t1")
    assert status == 413 and body["error"] == "too big"
    assert call(mw, "GET", "/fashion/train/status", query="task_id=t2")[0] == 404


def test_readyz_answers_503_when_dependencies_hang_and_passes_through_otherwise():
    async def hanging(scope, receive, send):
        await asyncio.sleep(3600)  # a dependency's readiness call that never returns (startup)

    status, body, _ = call(mw_for(hanging, ready_timeout=0.2), "GET", "/readyz")
    assert status == 503 and "not ready" in body["error"]
    ready, calls = make_app(200, {"ready": True})
    assert call(mw_for(ready, ready_timeout=0.2), "GET", "/readyz")[:2] == (200, {"ready": True})
    assert calls == ["/readyz"]


def test_a_late_readyz_probe_is_answered_503_but_not_cancelled():
    """Cancelling it would drop its calls to the dependencies' /readyz mid-request, and those
    services then hold a request without an answer, which blocked their exit on SIGTERM."""
    finished: list[str] = []

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(0.3)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            finished.append("answered")
        except asyncio.CancelledError:
            finished.append("cancelled")
            raise

    async def run() -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/readyz", "query_string": b"", "headers": []}
        await mw_for(slow, ready_timeout=0.1)(scope, receive, send)
        await asyncio.sleep(0.5)  # the probe goes on in the background
        return sent

    sent = asyncio.run(run())
    assert finished == ["answered"]
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [503]  # the late 200 went nowhere


def test_the_api_key_never_reaches_the_app():
    """BentoML keeps each task request with its headers on disk: the key must not be among them."""
    seen: list[dict] = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    headers = {**POST, "Authorization": "Bearer k"}
    assert call(mw_for(app, api_keys=["k"]), "POST", "/fashion/train/submit", headers)[0] == 200
    assert call(mw_for(app), "POST", "/fashion/search", headers)[0] == 200  # no keys configured
    assert seen and all(b"authorization" not in h for h in seen)
    assert all(h[b"content-length"] == b"10" for h in seen)  # the other headers pass through


# -- request ids and the heavy-route bound (#19) ----------------------------------------------------


def test_every_answer_carries_a_request_id_and_errors_repeat_it():
    app, _ = make_app(200)
    status, _, headers = call(mw_for(app), "GET", "/domains")
    assert status == 200 and len(headers[b"x-request-id"]) == 16
    app, _ = make_app(400, [{"error": "bad thing"}])
    _, body, headers = call(mw_for(app), "GET", "/x", {"X-Request-ID": "lb-1234.a_b"})
    assert headers[b"x-request-id"] == b"lb-1234.a_b" and body["request_id"] == "lb-1234.a_b"
    # The middleware's own refusals too; a header that could inject text into logs is replaced.
    _, body, headers = call(mw_for(app), "POST", "/shoes/search", {**POST, "X-Request-ID": "a b\nINFO x"})
    assert body["request_id"] == headers[b"x-request-id"].decode() and " " not in body["request_id"]
    # Server faults as well (their message stays BentoML's).
    app, _ = make_app(500, {"error": "Internal Server Error"})
    _, body, headers = call(mw_for(app), "GET", "/x")
    assert body["request_id"] == headers[b"x-request-id"].decode()


def test_log_lines_written_during_a_request_carry_its_id(caplog):
    import logging

    from simserver.request_ids import RequestIdFilter

    async def app(scope, receive, send):
        logging.getLogger("simserver.test").warning("inside %s", "the handler")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    caplog.handler.addFilter(RequestIdFilter())
    sent: list[dict] = []

    async def run():
        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "method": "GET", "path": "/x", "headers": [(b"x-request-id", b"abc")]}
        await mw_for(app)(scope, receive, send)

    asyncio.run(run())
    assert [r.getMessage() for r in caplog.records] == ["[req abc] inside the handler"]


def test_heavy_requests_beyond_the_bound_get_429_with_retry_after():
    release = asyncio.Event()
    entered = []

    async def slow_app(scope, receive, send):
        entered.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw = mw_for(slow_app, heavy_routes=("relevance",), max_heavy_requests=2, domain_routes=("relevance",))

    async def one(path: str) -> tuple[int, dict]:
        out: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(m):
            out.append(m)

        headers = [(k.lower().encode(), v.encode()) for k, v in POST.items()]
        await mw({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send)
        return out[0]["status"], dict(out[0]["headers"])

    async def run():
        first = [asyncio.ensure_future(one("/fashion/relevance")) for _ in range(2)]
        await asyncio.sleep(0.05)
        third = await one("/fashion/relevance")
        other = asyncio.ensure_future(one("/fashion/search"))  # not heavy: not bounded
        await asyncio.sleep(0.05)
        release.set()
        done = [await f for f in first]
        after = await one("/fashion/relevance")  # the slots were given back
        return third, done, await other, after

    third, done, other, after = asyncio.run(run())
    assert third[0] == 429 and third[1][b"retry-after"] == b"5"
    assert [d[0] for d in done] == [200, 200] and other[0] == 200 and after[0] == 200
