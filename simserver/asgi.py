"""ASGI middleware for the gateway: clear JSON errors, unknown domains refused before the body."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any
from urllib.parse import parse_qs

from simserver.http_errors import error_body

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class GatewayMiddleware:
    """In front of every gateway route, before BentoML reads a body:

    * ``/{unknown}/search|train|images`` -> 404;
    * API keys: every change (training, items, versions: POST/PUT/DELETE) and, with
      ``search_requires_key``, every read needs ``Bearer <key>``;
    * body limits: ``Content-Length`` over the limit -> 413, a POST without one -> 411 (BentoML
      reads and, for tasks, stores the whole body before any handler could count it);
    * 4xx bodies rewritten to ``{"error": "..."}``; a task ``/status`` or ``/get`` unknown to this
      replica is answered from the job records in the artifact store;
    * ``/readyz`` answers within ``ready_timeout`` (503 if the dependencies do not).
    """

    MUTABLE = (
        "train",
        "items",
        "versions",
    )  # /{domain}/<these> change the domain: POST/PUT/DELETE need the key
    OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/docs", "/docs.json", "/schema.json", "/")

    def __init__(
        self,
        app: ASGIApp,
        domains: Collection[str],
        domain_routes: Collection[str],
        max_body_bytes: int,
        api_keys: Collection[str] = (),
        search_requires_key: bool = False,
        job_lookup: Callable[[str], dict | None] | None = None,
        ready_timeout: float = 4.0,
    ) -> None:
        self.app = app
        self.ready_timeout = ready_timeout
        self._late_probes: set[asyncio.Future] = set()  # answered 503, still running: see _readyz
        self.domains = domains
        self.domain_routes = domain_routes
        self.max_body_bytes = max_body_bytes
        self.api_keys = [k.encode() for k in api_keys]
        self.search_requires_key = search_requires_key
        self.job_lookup = job_lookup

    @staticmethod
    def options(domains: Mapping[str, Any], settings: Any, job_lookup: Callable[[str], dict | None]) -> dict:
        """The gateway's middleware options from its domains (``DomainConfig`` by name) and settings."""
        from simserver.domain_config import Limits
        from simserver.settings import api_keys

        uploads = [c.limits.max_upload_bytes for c in domains.values()] + [Limits().max_upload_bytes]
        return {
            "domains": set(domains),
            "domain_routes": ("search", "train", "images", "relevance", "items", "similar", "versions"),
            "api_keys": api_keys(settings),
            "search_requires_key": settings.search_requires_key,
            "job_lookup": job_lookup,
            # The largest upload a route takes plus room for the multipart envelope and other fields.
            "max_body_bytes": max(uploads) + 2**20,
        }

    async def _respond(self, send: Callable, status: int, body: Any, headers: list | None = None) -> None:
        raw = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()),
                    *(headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    async def _refuse(self, send: Callable, status: int, message: str, headers: list | None = None) -> None:
        await self._respond(send, status, {"error": message}, headers)

    def _needs_key(self, method: str, path: str, parts: list[str]) -> bool:
        if not self.api_keys or path in self.OPEN_PATHS or path.startswith(("/assets/", "/static_content/")):
            return False
        mutating = len(parts) >= 2 and parts[1] in self.MUTABLE and method in ("POST", "PUT", "DELETE")
        return mutating or self.search_requires_key

    def _auth_error(self, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return 401, "missing API key: send 'Authorization: Bearer <key>'"
        if not any(hmac.compare_digest(token.strip(), k) for k in self.api_keys):
            return 403, "API key not accepted"
        return None

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/readyz":
            await self._readyz(scope, receive, send)
            return
        parts = path.strip("/").split("/")
        if len(parts) >= 2 and parts[1] in self.domain_routes and parts[0] not in self.domains:
            known = ", ".join(sorted(self.domains)) or "none"
            await self._refuse(send, 404, f"unknown domain {parts[0]!r} (known: {known})")
            return
        headers = dict(scope.get("headers") or [])
        if self._needs_key(method, path, parts) and (err := self._auth_error(headers)):
            await self._refuse(
                send, err[0], err[1], [(b"www-authenticate", b"Bearer")] if err[0] == 401 else None
            )
            return
        if b"authorization" in headers:
            # Checked above and needed by nothing behind: BentoML stores each task's request with
            # its headers in its task database, which would keep the API key on disk in plain text.
            scope = {
                **scope,
                "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"],
            }
        if method in ("POST", "PUT"):
            length_header = headers.get(b"content-length")
            if length_header is None and path.endswith("/activate"):
                length_header = b"0"  # a POST without a body (curl -X POST sends no Content-Length)
            if length_header is None:
                await self._refuse(send, 411, "send the body with a Content-Length header")
                return
            try:
                length = int(length_header)
            except ValueError:
                await self._refuse(send, 400, "invalid Content-Length header")
                return
            if length > self.max_body_bytes:
                await self._refuse(
                    send, 413, f"request body is {length} bytes; the limit is {self.max_body_bytes}"
                )
                return
            ctype = headers.get(b"content-type", b"").lower()
            if ctype.startswith(b"multipart/form-data") and b"boundary=" not in ctype:
                await self._refuse(send, 400, "multipart/form-data request without a boundary")
                return
        task_query = (
            len(parts) == 3 and parts[1] == "train" and parts[2] in ("status", "get") and method == "GET"
        )

        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                hdrs = dict(message.get("headers") or [])
                if 400 <= message["status"] < 500 and b"json" in hdrs.get(b"content-type", b""):
                    held["start"] = message  # error bodies are small: hold and rewrite
                    return
                await send(message)
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start = held.pop("start")
                if (
                    task_query
                    and start["status"] == 404
                    and (answer := await self._from_records(scope, parts))
                ):
                    await self._respond(send, *answer)
                    return
                raw = b"".join(chunks)
                try:
                    raw = json.dumps(error_body(json.loads(raw))).encode()
                except ValueError:
                    pass
                out_headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                out_headers.append((b"content-length", str(len(raw)).encode()))
                await send({**start, "headers": out_headers})
                await send({"type": "http.response.body", "body": raw})
            else:
                await send(message)

        await self.app(scope, receive, send_wrapper)

    async def _readyz(self, scope: Scope, receive: Callable, send: Callable) -> None:
        """BentoML's /readyz, answered within ``ready_timeout`` seconds: a probe that arrives while
        the services are still starting otherwise waited for ever on a dependency (measured: no
        answer after 100 s, while the next probe got 200 at once). Load balancers give up on a
        silent probe; a 503 tells them "not yet".

        A probe that is late is answered 503 but left to finish in the background, not cancelled:
        cancelling it drops its calls to the dependencies' own /readyz mid-request, and each such
        service then holds a request that never gets an answer until its traffic timeout (120 or
        900 s), which blocked its exit on SIGTERM (measured: 10 s, the cap, instead of 0.7 s)."""
        state = {"started": False, "answered": False}

        async def forward(message: dict) -> None:
            if state["answered"]:
                return  # we said 503 already; the late answer goes nowhere
            state["started"] = True
            await send(message)

        probe = asyncio.ensure_future(self.app(scope, receive, forward))
        done, _ = await asyncio.wait({probe}, timeout=self.ready_timeout)
        if probe in done or state["started"]:
            await probe
            return
        state["answered"] = True
        self._late_probes.add(probe)
        probe.add_done_callback(self._late_probe_done)
        await self._refuse(send, 503, f"not ready: dependencies did not answer in {self.ready_timeout} s")

    def _late_probe_done(self, probe: asyncio.Future) -> None:
        self._late_probes.discard(probe)
        if not probe.cancelled() and probe.exception() is not None:
            logger.info("a late /readyz probe failed: %r", probe.exception())

    async def _from_records(self, scope: Scope, parts: list[str]) -> tuple[int, Any] | None:
        import anyio

        from simserver.jobs import JobRecords

        task_id = parse_qs(scope.get("query_string", b"").decode()).get("task_id", [""])[0]
        if not self.job_lookup or not task_id:
            return None
        try:
            record = await anyio.to_thread.run_sync(self.job_lookup, task_id)
        except Exception:
            return None
        if not record or record.get("domain") != parts[0]:
            return None
        if parts[2] == "status":
            return 200, JobRecords.status_json(record)
        return JobRecords.result_response(record)


def _takes_a_list(annotation: Any) -> bool:
    """``list[X]`` or ``list[X] | None``: a field that may be sent several times."""
    from typing import get_args

    from _bentoml_sdk.typing_utils import is_list_type, is_union_type

    if is_union_type(annotation):
        return any(_takes_a_list(a) for a in get_args(annotation) if a is not type(None))
    return bool(is_list_type(annotation))


def _is_text(annotation: Any) -> bool:
    """``str``, ``list[str]``, optionally ``| None``: a field whose text must stay text (BentoML
    json-decodes every multipart text value, so a label "123" became the int 123 and failed)."""
    from typing import get_args, get_origin

    from _bentoml_sdk.typing_utils import is_union_type

    if annotation is str:
        return True
    if is_union_type(annotation):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return len(args) == 1 and _is_text(args[0])
    if get_origin(annotation) is list:
        return get_args(annotation) == (str,)
    return False


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
            form = await request.form()  # parsed once: BentoML's parse reads the cached form
        except HTTPException as exc:
            raise BadInput(f"malformed multipart body: {exc.detail}") from None
        for name in set(form.keys()):
            # BentoML json-decodes a file part sent under a non-file field name (500 on binary).
            if name not in cls.multipart_fields and isinstance(form[name], UploadFile):
                expected = ", ".join(sorted(cls.multipart_fields)) or "none"
                raise BadInput(f"{name}: not a file field of this route (file fields: {expected})")
            # BentoML would silently use the first of several values for a one-value field.
            field = cls.model_fields.get(name)
            many = len(form.getlist(name))
            if many > 1 and field is not None and not _takes_a_list(field.annotation):
                raise BadInput(f"{name}: sent {many} times; this field takes one value")
        text = {
            name: field
            for name, field in cls.model_fields.items()
            if name in form and name not in cls.multipart_fields and _is_text(field.annotation)
        }
        if not text:
            return await original_parse(self, request, cls)
        # Text fields as sent (a repeated one as a list); the rest as BentoML parses them.
        parsed = await original_parse(self, request, _without(cls, set(text)))
        values: dict[str, Any] = {name: list(form.getlist(name)) for name in text}
        for name, field in text.items():
            got = [v for v in values[name] if isinstance(v, str)]
            values[name] = got if _takes_a_list(field.annotation) else got[-1]
        return cls.model_validate({**dict(parsed), **values})

    def _without(cls: Any, names: set[str]) -> Any:
        """``cls`` as BentoML's parser needs it, minus ``names`` (they are parsed above)."""

        class Rest:
            multipart_fields = [f for f in cls.multipart_fields if f not in names]
            model_fields = {k: v for k, v in cls.model_fields.items() if k not in names}

            @staticmethod
            def model_validate(data: dict) -> dict:
                return {k: v for k, v in data.items() if k not in names}

        return Rest

    MultipartSerde.ensure_file = staticmethod(ensure_file)
    MultipartSerde.parse_request = parse_request
    MultipartSerde._simserver_hardened = True
