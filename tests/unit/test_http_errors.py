"""simserver.http_errors: one {"error"} shape for every refusal, and only refusals are 4xx."""

from __future__ import annotations

import json
from http import HTTPStatus

import anyio
import pytest
from bentoml.exceptions import BentoMLException

from simserver.errors import Conflict, RequestRefused, TooLarge
from simserver.http_errors import InternalCallFailed, Remote, error_body, refusal


def as_service_answers(exc: RequestRefused) -> BentoMLException:
    """What BentoML's client raises when an internal service answers ``exc``."""
    return BentoMLException(json.dumps([{"error": exc.message}]), error_code=HTTPStatus(exc.status))


def test_error_body_unwraps_lists_validation_details_and_nested_service_bodies():
    assert error_body([{"error": "bad thing"}]) == {"error": "bad thing"}
    detail = {"error": "1 validation error for Input", "detail": [{"loc": ["top_k"], "msg": "too big"}]}
    assert error_body(detail)["error"] == "top_k: too big"
    nested = [{"error": json.dumps([{"error": "domain 'x' has no index yet"}])}]
    assert error_body(nested) == {"error": "domain 'x' has no index yet"}
    assert error_body({"ok": True}) == {"ok": True}
    assert error_body({"detail": "Method Not Allowed"}) == {"error": "Method Not Allowed"}


def test_refusal_accepts_only_refusals():
    assert refusal(TooLarge("too big")) == (413, "too big")
    assert refusal(as_service_answers(Conflict("busy"))) == (409, "busy")
    validation = '{"error": "1 validation error for Input", "detail": []}'
    assert refusal(BentoMLException(validation, error_code=HTTPStatus.BAD_REQUEST)) is None
    assert refusal(BentoMLException('{"detail": "Not Found"}', error_code=HTTPStatus.NOT_FOUND)) is None
    assert refusal(BentoMLException("[]", error_code=HTTPStatus.INTERNAL_SERVER_ERROR)) is None
    assert refusal(ValueError("x")) is None


def test_remote_raises_refusals_again_and_anything_else_as_a_fault():
    class Proxy:
        def __init__(self, exc):
            self.exc, self.to_async = exc, self

        async def search(self, **kwargs):
            if self.exc:
                raise self.exc
            return kwargs

    assert anyio.run(lambda: Remote(Proxy(None)).to_async.search(top_k=3)) == {"top_k": 3}
    with pytest.raises(RequestRefused) as err:
        anyio.run(lambda: Remote(Proxy(as_service_answers(Conflict("busy")))).to_async.search())
    assert (err.value.status, err.value.message) == (409, "busy")
    validation = BentoMLException('{"error": "x", "detail": []}', error_code=HTTPStatus.BAD_REQUEST)
    with pytest.raises(InternalCallFailed):
        anyio.run(lambda: Remote(Proxy(validation)).to_async.search())


def test_client_mistakes_are_one_info_line_and_faults_keep_their_traceback():
    import logging

    from bentoml.exceptions import BadInput
    from pydantic import BaseModel, ValidationError

    from simserver.errors import BadImage
    from simserver.http_errors import _RefusalsAreNotErrors

    class Input(BaseModel):
        top_k: int

    try:
        Input.model_validate({"top_k": "many"})
    except ValidationError as exc:
        invalid = exc

    def logged(exc: BaseException) -> logging.LogRecord:
        record = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on /x [POST]", (), None)
        record.exc_info = (type(exc), exc, None)
        _RefusalsAreNotErrors().filter(record)
        return record

    for mistake, status in (
        (BadImage("image: empty file"), 400),
        (BadInput("file fields ..."), 400),
        (invalid, 400),
    ):
        record = logged(mistake)
        assert record.levelno == logging.INFO and record.exc_info is None, mistake
        assert f"refused ({status})" in record.getMessage()
    fault = logged(RuntimeError("disk full"))
    assert fault.levelno == logging.ERROR and fault.exc_info is not None
