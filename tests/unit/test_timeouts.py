"""simserver.timeouts: BentoML's request timeout still answers 504, and leaves no timer behind."""

from __future__ import annotations

import asyncio
import gc

from bentoml._internal.server.http.traffic import TimeoutMiddleware

from simserver.timeouts import release_request_timers


def _pending_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    return [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]


def test_answered_requests_leave_no_armed_timer_and_slow_ones_still_time_out():
    release_request_timers()
    release_request_timers()  # idempotent

    async def app(scope, receive, send):
        if scope["path"] == "/slow":
            await asyncio.sleep(5)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = TimeoutMiddleware(app, timeout=0.3)

    async def one(path: str) -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(m):
            sent.append(m)

        await mw({"type": "http", "path": path, "method": "GET", "headers": []}, receive, send)
        return sent

    async def run():
        loop = asyncio.get_running_loop()
        mw.timeout = 900.0
        for _ in range(50):
            assert (await one("/fast"))[0]["status"] == 200
        armed = len(_pending_timers(loop))  # BentoML's own left 50 timers armed for 900 s
        mw.timeout = 0.3
        slow = await one("/slow")
        return armed, slow

    armed, slow = asyncio.run(run())
    gc.collect()
    assert armed == 0
    assert slow[0]["status"] == 504


def test_every_uvicorn_server_keeps_idle_connections_longer_than_its_clients():
    import uvicorn

    from simserver.timeouts import KEEP_ALIVE_S, keep_connections_alive

    keep_connections_alive()
    keep_connections_alive()  # idempotent
    assert uvicorn.Config(app=None, timeout_keep_alive=5).timeout_keep_alive == KEEP_ALIVE_S
    assert uvicorn.Config(app=None).timeout_keep_alive == KEEP_ALIVE_S
    assert uvicorn.Config(app=None, timeout_keep_alive=900).timeout_keep_alive == 900  # longer stays
    assert KEEP_ALIVE_S > 300  # the ALB's idle timeout (deploy/aws/stack.yaml)
