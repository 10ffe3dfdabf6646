"""Requests the server refuses: one exception family, each member carrying its HTTP status.

Library code raises these where the *client* is at fault (a corrupt image, an unknown id, a
domain with no version yet). They derive from BentoML's exception so that BentoML itself answers
them with their status, in the gateway and in the internal services alike;
:mod:`simserver.http_errors` then gives every refusal one JSON shape, ``{"error": message}``.
Anything else that escapes is the server's fault and answers 500.
"""

from __future__ import annotations

from http import HTTPStatus

# Only the exception module: importing it does not load the rest of BentoML.
from bentoml.exceptions import BentoMLException


class RequestRefused(BentoMLException):
    """The request cannot be served as sent; never the server's fault, so never a 500."""

    status: int = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        # error_code is set per instance, not per class: a class attribute would register these
        # in BentoML's own status -> exception table, which its HTTP client uses.
        super().__init__(message, error_code=HTTPStatus(self.status))


class BadImage(RequestRefused):
    status = 400


class BadArchive(RequestRefused):
    status = 400


class UnknownDomain(RequestRefused):
    status = 404


class UnknownItem(RequestRefused):
    status = 404


class Conflict(RequestRefused):
    status = 409


class TooLarge(RequestRefused):
    status = 413
