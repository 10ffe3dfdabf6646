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
import json
import re
from collections.abc import Collection, Mapping
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

_NULL = {"nullable": True, "enum": [None]}
# Exactly one of the two (the route refuses both or neither), and a filter with a condition.
_DELETE_BODY: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "required": ["ids"],
            "properties": {"ids": {"type": "array", "items": {"type": "string"}}, "filter": _NULL},
        },
        {
            "type": "object",
            "required": ["filter"],
            "properties": {
                "filter": {"type": "object", "minProperties": 1, "description": "as on /search"},
                "ids": _NULL,
            },
        },
    ]
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
    ("/{domain}/match/groups/cancel", "put"),
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
    if "/train" in path or "/duplicates" in path or "/match/groups" in path:
        codes += [404, 409, 503]
        if path.endswith("/get"):
            codes.append(413)  # a failed job answers with the status its refusal had
    return sorted(set(codes))


def _nullable_defaults(schema: Any) -> None:
    """A form field whose default is null accepts null: BentoML drops the ``| None``."""
    if isinstance(schema, dict):
        for prop in (schema.get("properties") or {}).values():
            if isinstance(prop, dict) and isinstance(prop.get("anyOf"), list):
                # OpenAPI 3.0 has no "type": "null": ``X | None`` is X, nullable.
                options = [o for o in prop["anyOf"] if not (isinstance(o, dict) and o.get("type") == "null")]
                if len(options) < len(prop["anyOf"]):
                    prop["nullable"] = True
                    if len(options) == 1 and isinstance(options[0], dict):
                        del prop["anyOf"]
                        prop.update({k: v for k, v in options[0].items() if k not in prop})
                    else:
                        prop["anyOf"] = options
            if isinstance(prop, dict) and "default" in prop and prop["default"] is None and "type" in prop:
                prop["nullable"] = True
        for value in schema.values():
            if isinstance(value, dict | list):
                _nullable_defaults(value)
    elif isinstance(schema, list):
        for value in schema:
            _nullable_defaults(value)


def _is_text(prop: Any) -> bool:
    """A scalar field: a string (not a file), a number, an integer or a boolean."""
    options = prop.get("anyOf", [prop]) if isinstance(prop, dict) else []
    scalar = ("string", "number", "integer", "boolean")
    return any(
        isinstance(o, dict) and o.get("type") in scalar and o.get("format") != "binary" for o in options
    )


def _plain_text_fields(op: dict[str, Any]) -> None:
    """A multipart body's scalar fields are read as plain text (``curl -F text=falafel -F
    top_k=5``), not as JSON: BentoML declares every non-file field ``application/json``, so a
    schema-driven client would send ``"falafel"`` with its quotes, and a fuzzer a JSON array the
    route takes as text."""
    form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data")
    if not form:
        return
    props = (form.get("schema") or {}).get("properties") or {}
    for name, prop in props.items():
        if _is_text(prop):
            form.get("encoding", {}).pop(name, None)


def api_operations(svc: Any) -> dict[str, dict[str, Any]]:
    """Every BentoML API's operations, by path, as BentoML documents them. Its document keeps one
    entry per path, so an API that shares its path with a FastAPI route (``POST /{domain}/items``
    beside ``GET``) is missing from it; :func:`complete` puts these back."""
    # Private helpers of the pinned bentoml (1.4.39): the only place the per-API entries exist.
    from _bentoml_sdk.service.openapi import _get_api_routes
    from bentoml._internal.utils.cattr import bentoml_cattr

    # Through JSON: status codes become the strings the served document has.
    return json.loads(json.dumps({p: bentoml_cattr.unstructure(i) for p, i in _get_api_routes(svc).items()}))


def complete(
    spec: dict[str, Any],
    domains: Collection[str],
    relevance_domains: Collection[str] | None = None,
    operations: Mapping[str, Mapping[str, Any]] | None = None,
    text_domains: Collection[str] | None = None,
) -> dict[str, Any]:
    """A copy of BentoML's ``spec`` with path parameters, error replies and task shapes declared.
    ``relevance_domains``: the domains with a target label (the only ones ``/relevance`` serves);
    ``operations``: :func:`api_operations`, added where the document lacks them;
    ``text_domains``: the domains with text configured (the only ones ``/match`` serves)."""
    spec = copy.deepcopy(spec)
    for path, item in (operations or {}).items():
        have = spec.setdefault("paths", {}).setdefault(path, {})
        for method, op in item.items():
            have.setdefault(method, copy.deepcopy(op))
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
                if ("/match" in path) and text_domains is not None:  # /match, /match/groups and its task
                    param["schema"]["enum"] = sorted(text_domains)
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
            _plain_text_fields(op)
            if any(
                (c.get("schema") or {}).get("required")
                for c in op.get("requestBody", {}).get("content", {}).values()
            ):
                op["requestBody"]["required"] = (
                    True  # BentoML leaves it out: a request without a body is a 400
                )
            if path.endswith(("/duplicates/submit", "/duplicates/calibrate")):
                # The gateway takes no body or {} (a body with fields is a 400).
                schema = {"type": "object", "additionalProperties": False}
                op["requestBody"] = {"required": False, "content": {"application/json": {"schema": schema}}}
            if (path, method) == ("/{domain}/items/delete", "post"):
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _DELETE_BODY}},
                }
            if path.endswith(("/submit", "/retry")):
                responses["200"]["content"] = {
                    "application/json": {"schema": {"$ref": "#/components/schemas/TaskSubmitted"}}
                }
    return spec


# Path parameters that hold slashes (item ids may: the routes declare them ``{item_id:path}``).
_SLASHED = {"item_id"}


class AllowedMethods:
    """The methods the document declares for a request path, for the ``Allow`` header of a 405 or an
    ``OPTIONS`` reply: Starlette's lists the first matching route only (``GET`` for
    ``/{domain}/items/{id}``, which also takes ``DELETE``)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self._templates: list[tuple[re.Pattern[str], int, str]] = []
        for path, item in spec.get("paths", {}).items():
            methods = sorted(m.upper() for m in item if m in ("get", "put", "post", "delete", "patch"))
            if not methods:
                continue
            parts = re.split(r"(\{[^}]+\})", path)
            regex = "".join(
                ("(.+)" if p[1:-1] in _SLASHED else "([^/]+)") if p.startswith("{") else re.escape(p)
                for p in parts
            )
            self._templates.append((re.compile(f"^{regex}$"), path.count("{"), ", ".join(methods)))

    def __call__(self, path: str) -> str | None:
        """``Allow`` for ``path``: the most specific matching template's methods (``/x/items/delete``
        is the delete route, not an item called "delete"); None if no template matches."""
        hits = [(params, allow) for regex, params, allow in self._templates if regex.match(path)]
        return min(hits)[1] if hits else None
