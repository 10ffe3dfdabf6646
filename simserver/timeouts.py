"""BentoML's per-request timeout without its memory leak.

BentoML 1.4's ``TimeoutMiddleware`` arms ``loop.call_later(traffic timeout, ...)`` for every request
and never cancels it: each request's timer, and with it the request's context (its tracing span, its
parsed form and upload), stays alive for the whole timeout after the answer was sent. With the
gateway's 900 s timeout that was about 17 KB per request for 15 minutes: +128% gateway RSS over
10,500 requests of ``simserver bench soak`` (139.7 -> 317.9 MB), and the index services grew too.
:func:`release_request_timers` replaces its ``__call__`` with the same logic plus the cancel.
"""

from __future__ import annotations

import asyncio
from typing import Any


def release_request_timers() -> None:
    """Patch ``TimeoutMiddleware`` (idempotent); every service process calls it at import."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware
    from starlette.responses import JSONResponse

    if getattr(TimeoutMiddleware, "_simserver_patched", False):
        return

    async def call(self: Any, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            try:
                await waiter
            except TimeoutError:
                if fut.cancel():
                    body = {"error": f"Not able to process the request in {self.timeout} seconds"}
                    await JSONResponse(body, status_code=504)(scope, receive, send)
            else:
                await fut
        finally:
            timer.cancel()  # the one line BentoML lacks

    # setattr: mypy refuses assigning to a method, and the marker is not a declared attribute.
    setattr(TimeoutMiddleware, "__call__", call)  # noqa: B010
    setattr(TimeoutMiddleware, "_simserver_patched", True)  # noqa: B010


# Longer than any client keeps an idle connection open: BentoML's own client between the services
# (aiohttp, 15 s) and the ALB in front of the gateway (its idle timeout: 300 s, deploy/aws/stack.yaml).
KEEP_ALIVE_S = 310


def keep_connections_alive(seconds: int = KEEP_ALIVE_S) -> None:
    """Every service's uvicorn keeps an idle keep-alive connection ``seconds`` instead of 5 s
    (idempotent; every service process calls it at import, before its server is configured).

    ``bentoml serve --timeout-keep-alive`` reaches the entry service only. With 5 s, a client that
    reused an idle connection just as the server closed it got "connection reset by peer": a 500
    between the services (seen by the OpenAPI fuzz and by a training started ~5 s after another).
    """
    import uvicorn

    init = uvicorn.Config.__init__
    if getattr(init, "_simserver_patched", False):
        return

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["timeout_keep_alive"] = max(kwargs.get("timeout_keep_alive") or 0, seconds)
        init(self, *args, **kwargs)

    patched._simserver_patched = True  # type: ignore[attr-defined]
    uvicorn.Config.__init__ = patched  # type: ignore[method-assign]
