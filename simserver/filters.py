"""Metadata filters of ``/search``, ``/similar`` and ``POST /{domain}/items/delete``.

A filter is a JSON object; several keys are ANDed::

    {"label": "dress"}                              equality
    {"label": {"in": ["dress", "coat"]}}            membership (also "nin")
    {"metadata.brand": "acme"}                      a metadata.csv column
    {"metadata.price": {"gte": 10, "lt": 50}}       numeric range (gt, gte, lt, lte), also "eq" / "ne"
    {"id": {"in": ["a/1.png", "a/2.png"]}}

Fields: ``label``, ``id``, ``name`` and ``metadata.<column>``. Metadata values are the CSV's text;
a number in the filter compares numerically (a cell that is not a number never matches a range).
:func:`parse_filter` refuses anything else with :class:`BadFilter` (400) naming what is wrong;
:meth:`Filter.mask` evaluates a parsed filter over a column source, vectorised (NumPy), so a
filter over 100k items costs a few milliseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from simserver.errors import RequestRefused

OPERATORS = ("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte")
RANGE = ("gt", "gte", "lt", "lte")
FIELDS = ("label", "id", "name")
MAX_IN = 10_000


class BadFilter(RequestRefused):
    status = 400


Scalar = str | int | float | bool


@dataclass(frozen=True)
class Condition:
    field: str  # "label", "id", "name" or "metadata.<column>"
    op: str
    value: Any  # str/float for eq/ne/ranges, tuple for in/nin


@dataclass(frozen=True)
class Filter:
    conditions: tuple[Condition, ...]

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        for c in self.conditions:
            out.setdefault(c.field, {})[c.op] = list(c.value) if isinstance(c.value, tuple) else c.value
        return out

    def mask(
        self, column: Callable[[str], np.ndarray], numeric: Callable[[str], np.ndarray], n: int
    ) -> np.ndarray:
        """Which of ``n`` rows match: ``column(field)`` gives a field's text (object array),
        ``numeric(field)`` the same parsed as float (NaN if not a number)."""
        keep = np.ones(n, dtype=bool)
        for c in self.conditions:
            keep &= _condition_mask(c, column, numeric)
            if not keep.any():
                break
        return keep


def _text(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _condition_mask(
    c: Condition, column: Callable[[str], np.ndarray], numeric: Callable[[str], np.ndarray]
) -> np.ndarray:
    if c.op in RANGE:
        x = numeric(c.field)
        with np.errstate(invalid="ignore"):
            if c.op == "gt":
                return x > c.value
            if c.op == "gte":
                return x >= c.value
            if c.op == "lt":
                return x < c.value
            return x <= c.value
    if c.op in ("eq", "ne"):
        if isinstance(c.value, float):  # numbers compare as numbers: "10.0" == 10
            with np.errstate(invalid="ignore"):
                hit = numeric(c.field) == c.value
        else:
            hit = column(c.field) == c.value
        return np.asarray(hit, dtype=bool) if c.op == "eq" else ~np.asarray(hit, dtype=bool)
    values = np.asarray(list(c.value), dtype=object)
    hit = np.isin(column(c.field), values)
    return hit if c.op == "in" else ~hit


def _scalar(field: str, op: str, v: Any) -> str | float:
    if isinstance(v, bool):
        return _text(v)
    if isinstance(v, int | float):
        if not math.isfinite(v):
            raise BadFilter(f"filter: {field}.{op}: numbers must be finite")
        return float(v)
    if isinstance(v, str):
        return v
    raise BadFilter(f"filter: {field}.{op}: expected a string or a number, got {type(v).__name__}")


def _check_field(field: Any) -> str:
    if not isinstance(field, str) or not field:
        raise BadFilter("filter: keys must be non-empty strings")
    if field in FIELDS:
        return field
    if field.startswith("metadata.") and len(field) > len("metadata."):
        return field
    raise BadFilter(
        f"filter: unknown field {field!r} (use label, id, name or metadata.<column>, e.g. metadata.brand)"
    )


def parse_filter(raw: Any) -> Filter:
    """A filter from its JSON text or decoded object; :class:`BadFilter` (400) if malformed.
    ``None``, ``""`` and ``{}`` are the empty filter (everything matches)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return Filter(())
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError as exc:
            raise BadFilter(f"filter: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BadFilter(
            f'filter: expected a JSON object such as {{"label": "dress"}}, got {type(raw).__name__}'
        )
    conditions: list[Condition] = []
    for key, spec in raw.items():
        field = _check_field(key)
        if not isinstance(spec, dict):
            if isinstance(spec, list):
                raise BadFilter(f'filter: {field}: a list needs an operator: {{"in": [...]}}')
            conditions.append(Condition(field, "eq", _norm_eq(field, "eq", spec)))
            continue
        if not spec:
            raise BadFilter(f"filter: {field}: empty operator object (use one of {', '.join(OPERATORS)})")
        for op, v in spec.items():
            if op not in OPERATORS:
                raise BadFilter(
                    f"filter: {field}: unknown operator {op!r} (use one of {', '.join(OPERATORS)})"
                )
            if op in ("in", "nin"):
                if not isinstance(v, list) or not v:
                    raise BadFilter(f"filter: {field}.{op}: expected a non-empty list")
                if len(v) > MAX_IN:
                    raise BadFilter(f"filter: {field}.{op}: at most {MAX_IN} values")
                conditions.append(Condition(field, op, tuple(_text(_scalar(field, op, x)) for x in v)))
            elif op in RANGE:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise BadFilter(f"filter: {field}.{op}: expected a number, got {json.dumps(v)}")
                conditions.append(Condition(field, op, _scalar(field, op, v)))
            else:
                conditions.append(Condition(field, op, _norm_eq(field, op, v)))
    return Filter(tuple(conditions))


def _norm_eq(field: str, op: str, v: Any) -> str | float:
    value = _scalar(field, op, v)
    if isinstance(value, float) and field in FIELDS:
        return _text(value)  # label, id and name are text: 7 means "7"
    return value
