"""Client-facing errors: each carries the HTTP status the gateway answers with."""

from __future__ import annotations


class ClientError(Exception):
    """A problem with what the client sent; never the server's fault, so never a 500."""

    status: int = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadImage(ClientError):
    status = 400


class TooLarge(ClientError):
    status = 413


class BadArchive(ClientError):
    status = 400


class UnknownDomain(ClientError):
    status = 404


class NotFoundError(ClientError):
    status = 404


class Conflict(ClientError):
    status = 409
