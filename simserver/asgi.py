"""ASGI middleware for the gateway: clear JSON errors, unknown domains refused before the body."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any
from urllib.parse import parse_qs

from simserver import request_ids
from simserver.http_errors import error_body

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


async def _read_and_replay(receive: Callable) -> tuple[bytes, Callable]:
    """The request body read whole (its size is checked already), and a ``receive`` that gives it
    once more to the app behind, then whatever the client does next (a disconnect)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return body, replay


class GatewayMiddleware:
    """In front of every gateway route, before BentoML reads a body:

    * ``/{unknown}/search|train|images`` -> 404;
    * API keys: every change (training, items, versions: POST/PUT/DELETE) and, with
      ``search_requires_key``, every read needs ``Bearer <key>``;
    * body limits: ``Content-Length`` over the limit -> 413, a POST without one -> 411 (BentoML
      reads and, for tasks, stores the whole body before any handler could count it);
    * 4xx bodies rewritten to ``{"error": "..."}``; a task ``/status`` or ``/get`` unknown to this
      replica is answered from the job records in the artifact store;
    * ``/readyz`` answers within ``ready_timeout`` (503 if the dependencies do not);
    * heavy routes (a site's images for ``/relevance``): at most ``max_heavy_requests`` at once,
      429 with ``Retry-After`` beyond, so a burst queues at the client, not in this memory;
    * a request id (:mod:`simserver.request_ids`) in the response header, every error body and the
      log lines of the request.
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
        heavy_routes: Collection[str] = (),
        relevance_domains: Collection[str] | None = None,
        text_domains: Collection[str] | None = None,
        task_choices: Mapping[str, Collection[str]] | None = None,
        task_files: Collection[str] = (),
        max_heavy_requests: int = 2,
        retry_after_s: int = 5,
        api_operations: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
    ) -> None:
        self.app = app
        self.api_operations = api_operations
        self._document: dict[str, Any] | None = None  # the completed OpenAPI document, once made
        self._allowed: Callable[[str], str | None] | None = None
        self.heavy_routes = heavy_routes
        self.relevance_domains = relevance_domains
        self.text_domains = text_domains
        self.task_choices = task_choices or {}
        self.task_files = task_files
        self.max_heavy_requests = max_heavy_requests
        self.retry_after_s = retry_after_s
        self._heavy_in_flight = 0
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
        from typing import get_args

        from simserver.domain_config import Limits
        from simserver.finetune import TrainingMode
        from simserver.settings import api_keys

        uploads = [c.limits.max_upload_bytes for c in domains.values()] + [Limits().max_upload_bytes]
        return {
            "domains": set(domains),
            "domain_routes": (
                *("search", "train", "images", "relevance", "items", "similar", "versions"),
                "duplicates",
                "match",
            ),
            # Multi-image requests: a site's images, a catalog upload.
            "heavy_routes": ("relevance", "items"),
            "relevance_domains": {n for n, c in domains.items() if c.target_label},
            "text_domains": {n for n, c in domains.items() if c.text is not None},
            "task_choices": {"mode": get_args(TrainingMode), "catalog": ("replace", "merge")},
            "task_files": ("archive",),
            "max_heavy_requests": settings.max_heavy_requests,
            "api_keys": api_keys(settings),
            "search_requires_key": settings.search_requires_key,
            "job_lookup": job_lookup,
            # The largest upload a route takes plus room for the multipart envelope and other fields.
            "max_body_bytes": max(uploads) + 2**20,
        }

    async def _respond(self, send: Callable, status: int, body: Any, headers: list | None = None) -> None:
        if status >= 400 and isinstance(body, dict) and (rid := request_ids.current.get()):
            body = {**body, "request_id": rid}
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
        if path == "/ui" or path.startswith("/ui/"):  # the web interface's files; its API calls send the key
            return False
        mutating = len(parts) >= 2 and parts[1] in self.MUTABLE and method in ("POST", "PUT", "DELETE")
        mutating = mutating or (parts[1:] == ["duplicates", "calibrate"] and method == "POST")
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
        rid = request_ids.from_header(dict(scope.get("headers") or []).get(request_ids.HEADER))
        tokens = request_ids.bind(rid)
        # Also as a header: BentoML's OpenTelemetry middleware, behind this one, makes the request's
        # context from its headers alone, and that context is what calls to other services carry.
        scope = {**scope, "headers": request_ids.with_baggage(scope.get("headers") or [], rid)}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                drop = {request_ids.HEADER}
                extra = [(request_ids.HEADER, rid.encode())]
                if message["status"] == 405 and (allow := await self._allow(scope)) is not None:
                    drop.add(b"allow")
                    extra.append((b"allow", allow.encode()))
                hdrs = [(k, v) for k, v in message.get("headers", []) if k.lower() not in drop]
                message = {**message, "headers": [*hdrs, *extra]}
            await send(message)

        try:
            await self._handle(scope, receive, send_with_id)
        finally:
            request_ids.unbind(tokens)

    async def _handle(self, scope: Scope, receive: Callable, send: Callable) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/readyz":
            await self._readyz(scope, receive, send)
            return
        if path == "/docs.json" and method == "GET":
            await self._openapi(scope, receive, send)
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
        task = task_route(parts)  # (kind, action) of /{domain}/<kind>/<action>
        if task is not None and task[1] == "cancel":
            why = (
                "a training cannot be cancelled: it ends by itself, and publishes only if it completes"
                if task[0] == "train"
                else f"a {task[0]} task cannot be cancelled: it ends by itself"
            )
            await self._refuse(send, 405, why, [(b"allow", b"GET")])
            return
        if method in ("POST", "PUT"):
            length_header = headers.get(b"content-length")
            if length_header is None and path.endswith(
                ("/activate", "/duplicates/submit", "/duplicates/calibrate")
            ):
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
        if len(parts) == 3 and parts[1:] == ["train", "submit"] and method == "POST":
            # BentoML stores a task and answers 200 before it parses the form: a bad choice would
            # only fail later, in the task. Checked here so the submit itself gets the 400.
            receive, problem = await self._checked_task_form(scope, receive)
            if problem:
                await self._refuse(send, 400, problem)
                return
        if len(parts) == 2 and parts[1] == "duplicates" and method == "POST":
            # BentoML's direct call of the task: a whole-catalog scan can take minutes.
            await self._refuse(
                send, 405, f"the scan is a task: POST /{parts[0]}/duplicates/submit, then /status and /get"
            )
            return
        if len(parts) == 3 and parts[1] == "duplicates" and parts[2] in ("submit", "calibrate"):
            # These take no input; BentoML would accept any JSON body (a list included) as none.
            receive, problem = await self._checked_empty_body(receive)
            if problem:
                await self._refuse(send, 400, problem)
                return
        if task == ("match/groups", "submit") and method == "POST":
            # BentoML stores the task and answers 200 before it reads the body: checked here.
            receive, problem = await self._checked_match_groups(parts[0], receive)
            if problem:
                await self._refuse(send, 400, problem)
                return
        task_query = task is not None and task[1] in ("status", "get") and method == "GET"
        task_result = task_query and task is not None and task[1] == "get"
        kind = task[0] if task is not None else ""
        heavy = len(parts) == 2 and parts[1] in self.heavy_routes and method == "POST"
        heavy = heavy or (parts[1:] == ["duplicates", "check"] and method == "POST")
        if heavy and self._heavy_in_flight >= self.max_heavy_requests:
            await self._refuse(
                send,
                429,
                f"{self._heavy_in_flight} {parts[1]} requests are running (the limit); retry in "
                f"{self.retry_after_s} s",
                [(b"retry-after", str(self.retry_after_s).encode())],
            )
            return

        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                hdrs = dict(message.get("headers") or [])
                ctype = hdrs.get(b"content-type", b"")
                if message["status"] >= 400 and (b"json" in ctype or ctype.startswith(b"text/plain")):
                    held["start"] = message  # error bodies are small: hold and rewrite
                    return
                if task_result and message["status"] == 200:
                    held["result"] = message  # checked: BentoML's task ids are shared by all tasks
                    return
                await send(message)
            elif message["type"] == "http.response.body" and "result" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start, raw = held.pop("result"), b"".join(chunks)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                if not isinstance(body, dict) or TASK_RESULT_KEYS[kind] not in body:
                    await self._refuse(send, 404, f"no {kind} task with this task_id")
                    return
                await send(start)
                await send({"type": "http.response.body", "body": raw})
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start = held.pop("start")
                answer = (
                    await self._from_records(scope, parts[0], *task)
                    if task is not None and task_query
                    else None
                )
                if answer and (start["status"] == 404 or answer[0] == 404):
                    # BentoML forgot the task (another replica's, or a restart), or the id is
                    # another kind of task's, whose failure BentoML would answer here.
                    await self._respond(send, *answer)
                    return
                raw = b"".join(chunks)
                try:
                    body = error_body(json.loads(raw))
                except ValueError:  # Starlette's plain-text answers ("Not Found"): the same shape
                    body = {"error": raw.decode(errors="replace").strip() or "error"}
                if isinstance(body, dict):
                    body = {**body, "request_id": request_ids.current.get()}
                raw = json.dumps(body).encode()
                out_headers = [
                    (k, v)
                    for k, v in start.get("headers", [])
                    if k.lower() not in (b"content-length", b"content-type")
                ]
                out_headers.append((b"content-type", b"application/json"))
                out_headers.append((b"content-length", str(len(raw)).encode()))
                await send({**start, "headers": out_headers})
                await send({"type": "http.response.body", "body": raw})
            else:
                await send(message)

        if not heavy:
            await self.app(scope, receive, send_wrapper)
            return
        self._heavy_in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._heavy_in_flight -= 1

    async def _checked_match_groups(self, domain: str, receive: Callable) -> tuple[Callable, str | None]:
        """A match-groups submit: a domain with text configured and a JSON object naming two
        groups (whether they exist is the task's to say: the catalog is not here)."""
        body, replay = await _read_and_replay(receive)
        if self.text_domains is not None and domain not in self.text_domains:
            return (
                replay,
                f"domain {domain!r} has no text configured: add text: {{fields: [title]}} to its yaml",
            )
        try:
            form = json.loads(body)
        except ValueError:
            return replay, 'send a JSON object, e.g. {"group": "google", "against": "twitter"}'
        if not isinstance(form, dict):
            return replay, 'send a JSON object, e.g. {"group": "google", "against": "twitter"}'
        for name in ("group", "against"):
            if not isinstance(form.get(name), str) or not form[name]:
                return replay, f"{name}: required, a group's name (a value of the domain's text.group column)"
        if form.get("fusion") not in (None, "weighted", "rrf"):
            return replay, "fusion: one of weighted, rrf"
        limit = form.get("threshold")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 <= limit <= 1
        ):
            return replay, "threshold: a number from 0 to 1"
        return replay, None

    async def _checked_empty_body(self, receive: Callable) -> tuple[Callable, str | None]:
        """The body read once (its size is checked already) and replayed: no body or ``{}``."""
        body, replay = await _read_and_replay(receive)
        try:
            ok = not body.strip() or json.loads(body) == {}
        except ValueError:
            ok = False
        return replay, None if ok else "this route takes no input: send no body, or {}"

    async def _checked_task_form(self, scope: Scope, receive: Callable) -> tuple[Callable, str | None]:
        """The body read once (its size is checked already) and replayed to BentoML; its choice
        fields (``task_choices``) checked. Returns the replaying ``receive`` and the problem."""
        from starlette.datastructures import Headers, UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        body, replay = await _read_and_replay(receive)

        async def stream():
            yield body

        problem = None
        headers = Headers(scope=scope)
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            return replay, "send the training as multipart/form-data with the zip in 'archive'"
        try:
            form = await MultiPartParser(headers, stream()).parse()
        except MultiPartException as exc:
            return replay, f"malformed multipart body: {exc.message}"
        try:
            for name in self.task_files:
                if not any(isinstance(v, UploadFile) for v in form.getlist(name)):
                    problem = f"{name}: missing; upload it as a file"
            for name, allowed in self.task_choices.items():
                for value in form.getlist(name):
                    if isinstance(value, UploadFile):
                        continue
                    try:
                        choice = json.loads(value)  # BentoML json-decodes a JSON-typed part
                    except ValueError:
                        choice = value
                    if choice not in allowed and value not in allowed:
                        problem = f"{name}: {value[:40]!r} is not one of {', '.join(allowed)}"
        finally:
            await form.close()
        return replay, problem

    async def _openapi(self, scope: Scope, receive: Callable, send: Callable) -> None:
        """BentoML's OpenAPI document, completed (:mod:`simserver.openapi`)."""
        document = await self._completed_document(scope)
        if document is None:
            await self._refuse(send, 500, "cannot generate the OpenAPI document")
            return
        await self._respond(send, 200, document)

    async def _completed_document(self, scope: Scope) -> dict[str, Any] | None:
        """The document, made once: BentoML's (asked of the app behind), completed. The domains
        and routes are fixed for the life of the process."""
        if self._document is not None:
            return self._document
        from simserver.openapi import complete

        got: dict[str, Any] = {"status": 500, "body": b""}

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                got["status"] = message["status"]
            elif message["type"] == "http.response.body":
                got["body"] += message.get("body", b"")

        async def no_body() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        ask = {**scope, "method": "GET", "path": "/docs.json", "raw_path": b"/docs.json", "query_string": b""}
        await self.app(ask, no_body, capture)
        try:
            spec = json.loads(got["body"])
        except ValueError:
            spec = None
        if got["status"] != 200 or not isinstance(spec, dict):
            return None
        operations = self.api_operations() if self.api_operations else None
        self._document = complete(
            spec, self.domains, self.relevance_domains, operations, text_domains=self.text_domains
        )
        return self._document

    async def _allow(self, scope: Scope) -> str | None:
        """The ``Allow`` header of a 405: the methods the document declares for the path."""
        if self._allowed is None:
            from simserver.openapi import AllowedMethods

            if (document := await self._completed_document(scope)) is None:
                return None
            self._allowed = AllowedMethods(document)
        return self._allowed(scope["path"])

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

    async def _from_records(
        self, scope: Scope, domain: str, kind: str, action: str
    ) -> tuple[int, Any] | None:
        import anyio

        from simserver.jobs import JobRecords

        task_id = parse_qs(scope.get("query_string", b"").decode()).get("task_id", [""])[0]
        if not self.job_lookup or not task_id:
            return None
        try:
            record = await anyio.to_thread.run_sync(self.job_lookup, task_id)
        except Exception:
            return None
        if not record or record.get("domain") != domain:
            return None
        if record.get("kind", "train") != kind:  # another kind of task with this id
            return 404, {"error": f"no {kind} task with this task_id"}
        if action == "status":
            return 200, JobRecords.status_json(record)
        return JobRecords.result_response(record)


# The task routes (/{domain}/<kind>/submit|status|get) and the key each one's result has.
TASK_RESULT_KEYS = {"train": "indexed", "duplicates": "groups", "match/groups": "pairs"}
TASK_ACTIONS = ("submit", "status", "get", "retry", "cancel")


def task_route(parts: list[str]) -> tuple[str, str] | None:
    """(kind, action) of a task route's path parts (``["food", "match", "groups", "get"]`` ->
    ``("match/groups", "get")``), None for any other path."""
    if len(parts) < 3 or parts[-1] not in TASK_ACTIONS:
        return None
    kind = "/".join(parts[1:-1])
    return (kind, parts[-1]) if kind in TASK_RESULT_KEYS else None


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
