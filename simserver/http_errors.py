"""The one place where a refusal becomes ``{"error": message}`` with its HTTP status.

Every refusal is raised as :class:`simserver.errors.RequestRefused` (a BentoML exception, so
BentoML answers it with its status). What reaches the client then differs by where it was
raised; :func:`error_body` gives all of them one shape:

* BentoML wraps a refusal's message in a list: ``[{"error": "..."}]``;
* a refusal raised in an internal service reaches the gateway as a BentoML exception whose
  message is that service's whole JSON body, which BentoML wraps once more;
* BentoML's own validation errors say "1 validation error for Input" with the useful part in
  ``detail``.

The gateway's middleware (:mod:`simserver.asgi`) applies :func:`error_body` to every 4xx body, and
:func:`refusal` turns an exception from an internal service back into (status, message) where the
gateway itself needs it (training job records, the FastAPI routes).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import JSONResponse

from simserver.errors import RequestRefused

logger = logging.getLogger(__name__)


def _unwrap(message: str) -> str:
    """A message that is itself a JSON error body (from an internal service), unwrapped."""
    for _ in range(4):  # a refusal crosses at most gateway -> service -> service
        try:
            inner = json.loads(message)
        except ValueError:
            return message
        body = error_body(inner)
        if not (isinstance(body, dict) and isinstance(body.get("error"), str)):
            return message
        message = body["error"]
    return message


def error_body(body: Any) -> Any:
    """``{"error": "<field>: <what>"}`` from any 4xx body BentoML produces; other bodies unchanged."""
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict) and "error" in body[0]:
        body = body[0]
    if isinstance(body, dict) and isinstance(body.get("detail"), list) and body["detail"]:
        parts = []
        for d in body["detail"]:
            if isinstance(d, dict) and "msg" in d:
                loc = ".".join(str(x) for x in d.get("loc", ()) if x not in ("body",))
                parts.append(f"{loc}: {d['msg']}" if loc else d["msg"])
        if parts:  # the list said in one line; the schema's error shape has no `detail`
            body = {k: v for k, v in body.items() if k != "detail"} | {"error": "; ".join(parts)}
    if isinstance(body, dict) and isinstance(body.get("detail"), str) and "error" not in body:
        # Starlette's own refusals (405 "Method Not Allowed", 404 "Not Found") say it in `detail`.
        body = {k: v for k, v in body.items() if k != "detail"} | {"error": body["detail"]}
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        body = {**body, "error": _unwrap(body["error"])}
    return body


def _refused_body(message: str) -> str | None:
    """The message of a refusal answered by an internal service, else None. BentoML renders a
    :class:`RequestRefused` as exactly ``[{"error": message}]``; its other 4xx bodies (input
    validation, unknown routes) differ, and from an internal call they mean a gateway bug."""
    try:
        body = json.loads(message)
    except ValueError:
        return None
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict) and set(body[0]) == {"error"}:
        inner = body[0]["error"]
        return _unwrap(inner) if isinstance(inner, str) else None
    return None


def refusal(exc: BaseException) -> tuple[int, str] | None:
    """(status, message) if ``exc`` refuses the request, raised here or answered by an internal
    service; None for a server fault."""
    if isinstance(exc, RequestRefused):
        return exc.status, _unwrap(exc.message)
    if isinstance(exc, BentoMLException) and 400 <= int(exc.error_code) < 500:
        message = _refused_body(exc.message)
        if message is not None:
            return int(exc.error_code), message
    return None


class InternalCallFailed(RuntimeError):
    """An internal service failed a call for a reason that is not the client's: a 500."""


class Remote:
    """An internal service as the gateway calls it (``remote.to_async.search(...)``): a refusal it
    answers is raised again here as :class:`RequestRefused` with the same status and message; any
    other failure of the call is the server's fault and raises :class:`InternalCallFailed`."""

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy

    @property
    def to_async(self) -> Remote:
        return self

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._proxy.to_async, name)

        async def call(**kwargs: Any) -> Any:
            try:
                return await method(**kwargs)
            except BentoMLException as exc:
                answer = refusal(exc)
                if answer is None:
                    raise InternalCallFailed(f"{name}: {exc.message[:500]}") from exc
                raise RequestRefused(answer[1], answer[0]) from None

        return call


class _RefusalsAreNotErrors(logging.Filter):
    """BentoML logs every exception an API raises at ERROR with its traceback; a refusal is the
    client's mistake, so it becomes one INFO line (server faults keep their traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        refused = refusal(exc) if exc is not None else None
        if refused is None and isinstance(exc, ValidationError):  # BentoML's input validation: a 400
            refused = 400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        if refused is None and isinstance(exc, BentoMLException) and 400 <= int(exc.error_code) < 500:
            refused = int(exc.error_code), exc.message  # raised in this process (BadInput): the client's
        if refused is not None:
            where = record.getMessage().removeprefix("Exception on ")
            record.msg, record.args = "%s refused (%d): %s", (where, refused[0], refused[1])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_refusals() -> None:
    """Install :class:`_RefusalsAreNotErrors` on the logger BentoML reports API exceptions with."""
    log = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _RefusalsAreNotErrors) for f in log.filters):
        log.addFilter(_RefusalsAreNotErrors())


async def known_query_only(request: Request) -> None:
    """A FastAPI dependency: a query parameter the route does not take is a 400 (FastAPI would
    ignore it, so a misspelt ``?lable=`` silently lists everything)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    allowed: set[str] = set()
    stack = [dependant]
    while stack:  # the route's own parameters and those of its dependencies
        d = stack.pop()
        allowed |= {p.alias for p in d.query_params}
        stack.extend(d.dependencies)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        raise RequestRefused(f"unknown query parameter {', '.join(unknown)} (this route takes: {takes})")


def json_refusals(app: FastAPI) -> None:
    """The same ``{"error"}`` answers on the gateway's FastAPI routes: a refusal from an internal
    service keeps its status and message, and a malformed path or query parameter is a 400, as on
    the BentoML routes (FastAPI would say 422)."""

    @app.exception_handler(BentoMLException)
    async def refused(request: Request, exc: BentoMLException) -> JSONResponse:
        answer = refusal(exc)
        if answer is None:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc)
            return JSONResponse({"error": "internal error; see the server log"}, status_code=500)
        return JSONResponse({"error": answer[1]}, status_code=answer[0])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=400)
