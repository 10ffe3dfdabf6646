"""The gateway's OpenAPI document completed: what BentoML generates, plus what it leaves out.

BentoML 1.4 declares no ``domain`` path parameter (a schema-driven client or fuzzer cannot call any
``/{domain}/...`` route), documents error bodies with a ``detail`` string they never carry, lists
only 400/404/500, gives task status an enum without the job records' ``completed``/``failed``,
and makes ``/submit`` promise ``created_at``/``executed_at`` it does not send. :func:`complete`
fixes each in the served ``/docs.json``, so the document matches every reply (errors included);
``tests/integration/test_openapi.py`` holds it to that with schemathesis.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import Any

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong, for a person to read"},
        "request_id": {"type": "string", "description": "also in the X-Request-ID header and the log"},
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_REQUEST_ID = {"X-Request-ID": {"schema": {"type": "string"}, "description": "this request's id"}}

_WHY = {
    400: "bad input: a malformed field, file or parameter",
    401: "missing API key (when the server has keys)",
    403: "API key not accepted",
    404: "unknown domain, task or item",
    409: "conflict: the domain has no index yet, is already training, or the version asked for is "
    "no longer served",
    411: "a POST without Content-Length",
    413: "too large: the body, an image's pixels or decoded size, an archive's entries or sizes",
    429: "too many heavy requests at once; retry after Retry-After seconds",
    500: "server fault (no details; the request id leads to the log)",
    503: "not ready yet, or the training was interrupted",
}

# BentoML's ResultStatus values (its generated enum is outdated), which the job records share.
TASK_STATUSES = ["pending", "in_progress", "completed", "failed", "canceled"]
# BentoML's task cancel marks a task canceled but cannot stop it (the training goes on and may
# publish): the gateway refuses it, and the document does not offer it.
# The duplicates scan's direct call (BentoML adds one per task) is refused too: it is a task.
UNSUPPORTED = {
    ("/{domain}/train/cancel", "put"),
    ("/{domain}/duplicates/cancel", "put"),
    ("/{domain}/duplicates", "post"),
}


def _statuses(method: str, path: str) -> list[int]:
    if path in ("/livez", "/healthz", "/metrics"):
        return []
    if path == "/readyz":
        return [503]
    codes = [400, 401, 403, 500]
    if "{domain}" in path or path == "/similarity":  # /similarity takes an optional domain
        codes += [404, 409]  # 409: a domain with no index yet
    if method in ("post", "put"):
        codes += [411, 413]
    if path.endswith("/relevance"):
        codes.append(429)
    if "/train" in path or "/duplicates" in path:
        codes += [404, 409, 503]
        if path.endswith("/get"):
            codes.append(413)  # a failed job answers with the status its refusal had
    return sorted(set(codes))


def _nullable_defaults(schema: Any) -> None:
    """A form field whose default is null accepts null: BentoML drops the ``| None``."""
    if isinstance(schema, dict):
        for prop in (schema.get("properties") or {}).values():
            if isinstance(prop, dict) and "default" in prop and prop["default"] is None and "type" in prop:
                prop["nullable"] = True
        for value in schema.values():
            if isinstance(value, dict | list):
                _nullable_defaults(value)
    elif isinstance(schema, list):
        for value in schema:
            _nullable_defaults(value)


def complete(
    spec: dict[str, Any], domains: Collection[str], relevance_domains: Collection[str] | None = None
) -> dict[str, Any]:
    """A copy of BentoML's ``spec`` with path parameters, error replies and task shapes declared.
    ``relevance_domains``: the domains with a target label (the only ones ``/relevance`` serves)."""
    spec = copy.deepcopy(spec)
    for path, method in UNSUPPORTED:
        spec.get("paths", {}).get(path, {}).pop(method, None)
    _nullable_defaults(spec.get("paths"))
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    if status := schemas.get("TaskStatusResponse", {}).get("properties", {}).get("status"):
        status["enum"] = TASK_STATUSES
    schemas["TaskSubmitted"] = {
        "type": "object",
        "title": "TaskSubmitted",
        "required": ["task_id", "status"],
        "properties": {"task_id": {"type": "string"}, "status": {"type": "string", "enum": TASK_STATUSES}},
    }
    domain_param: dict[str, Any] = {
        "name": "domain",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": sorted(domains)},
        "description": "a domain of this server (GET /domains)",
    }
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            params = op.setdefault("parameters", [])
            if "{domain}" in path:
                param = copy.deepcopy(domain_param)
                if path.endswith("/relevance") and relevance_domains is not None:
                    param["schema"]["enum"] = sorted(relevance_domains)
                # FastAPI's routes declare it already, without the names: replaced.
                params[:] = [param, *(p for p in params if p.get("name") != "domain")]
            responses = op["responses"]
            for code in [c for c in responses if str(c).startswith(("4", "5"))]:
                del responses[code]
            for code in _statuses(method, path):
                reply: dict[str, Any] = {
                    "description": _WHY[code],
                    "content": {"application/json": {"schema": _ERROR_REF}},
                    "headers": dict(_REQUEST_ID),
                }
                if code == 429:
                    reply["headers"]["Retry-After"] = {"schema": {"type": "integer"}}
                responses[str(code)] = reply
            if path.endswith(("/submit", "/retry")):
                responses["200"]["content"] = {
                    "application/json": {"schema": {"$ref": "#/components/schemas/TaskSubmitted"}}
                }
    return spec
