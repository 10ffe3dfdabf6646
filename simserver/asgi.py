"""ASGI middleware for the gateway: clear JSON errors, unknown domains refused before the body."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def json_error(status: int, message: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": message}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, body


def clarify(body: Any) -> Any:
    """BentoML answers 4xx as ``[{"error": ...}]`` and validation errors as "1 validation error for
    Input" with the useful part in ``detail``; turn both into ``{"error": "<field>: <what>"}``."""
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict) and "error" in body[0]:
        body = body[0]
    if isinstance(body, dict) and isinstance(body.get("detail"), list) and body["detail"]:
        parts = []
        for d in body["detail"]:
            if isinstance(d, dict) and "msg" in d:
                loc = ".".join(str(x) for x in d.get("loc", ()) if x not in ("body",))
                parts.append(f"{loc}: {d['msg']}" if loc else d["msg"])
        if parts:
            body = {**body, "error": "; ".join(parts)}
    return body


class GatewayMiddleware:
    def __init__(
        self, app: ASGIApp, domains: Collection[str], domain_routes: Collection[str], max_body_bytes: int
    ) -> None:
        self.app = app
        self.domains = domains
        self.domain_routes = domain_routes
        self.max_body_bytes = max_body_bytes

    async def _refuse(self, send: Callable, status: int, message: str) -> None:
        start, body = json_error(status, message)
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parts = scope["path"].strip("/").split("/")
        if len(parts) >= 2 and parts[1] in self.domain_routes and parts[0] not in self.domains:
            known = ", ".join(sorted(self.domains)) or "none"
            await self._refuse(send, 404, f"unknown domain {parts[0]!r} (known: {known})")
            return
        headers = dict(scope.get("headers") or [])
        # BentoML reads (and, for tasks, stores) the whole body before any handler runs: refuse
        # oversized uploads from Content-Length first. Chunked bodies without it are not covered yet.
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0
        if length > self.max_body_bytes:
            await self._refuse(
                send, 413, f"request body is {length} bytes; the limit is {self.max_body_bytes}"
            )
            return
        ctype = headers.get(b"content-type", b"").lower()
        if (
            scope["method"] == "POST"
            and ctype.startswith(b"multipart/form-data")
            and b"boundary=" not in ctype
        ):
            await self._refuse(send, 400, "multipart/form-data request without a boundary")
            return

        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if 400 <= message["status"] < 500 and b"json" in headers.get(b"content-type", b""):
                    held["start"] = message  # error bodies are small: hold and rewrite
                    return
                await send(message)
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                raw = b"".join(chunks)
                try:
                    raw = json.dumps(clarify(json.loads(raw))).encode()
                except ValueError:
                    pass
                start = held.pop("start")
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(raw)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": raw})
            else:
                await send(message)

        await self.app(scope, receive, send_wrapper)


def harden_multipart() -> None:
    """Make BentoML's multipart parsing answer client mistakes with 400 instead of 500.

    BentoML 1.4 treats a *text* value in a file field as a URL and downloads it server-side (a
    server-side request forgery risk, and a 500 when the download fails), and lets malformed
    multipart bodies escape as 500s. Files must be uploaded here, so both become ``BadInput``.
    """
    from _bentoml_impl.serde import MultipartSerde
    from bentoml.exceptions import BadInput
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    if getattr(MultipartSerde, "_simserver_hardened", False):
        return
    original_parse = MultipartSerde.parse_request

    async def ensure_file(obj: Any) -> UploadFile:
        if isinstance(obj, UploadFile):
            return obj
        raise BadInput("file fields must be uploaded as files (multipart file parts), not text or URLs")

    async def parse_request(self, request, cls):
        try:
            return await original_parse(self, request, cls)
        except HTTPException as exc:
            raise BadInput(f"malformed multipart body: {exc.detail}") from None

    MultipartSerde.ensure_file = staticmethod(ensure_file)
    MultipartSerde.parse_request = parse_request
    MultipartSerde._simserver_hardened = True
