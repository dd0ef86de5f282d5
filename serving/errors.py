"""Serving-layer errors: the shared tree (``engine.errors``) plus the API's own codes.

The REST layer answers every :class:`SqlinferError` as ``{"error_code", "message"}`` with its
``http_status``; these add the statuses that only exist at the API (auth, limits, bad JSON).
"""

from __future__ import annotations

from engine.errors import (  # noqa: F401  (re-exported: the serving layer's one import site)
    InvalidParameterValue,
    ResourceAlreadyExists,
    ResourceConflict,
    ResourceDoesNotExist,
    SqlinferError,
)


class MalformedRequest(SqlinferError):
    error_code = "MALFORMED_REQUEST"
    http_status = 400


class Unauthenticated(SqlinferError):
    error_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(SqlinferError):
    error_code = "PERMISSION_DENIED"
    http_status = 403


class RequestLimitExceeded(SqlinferError):
    error_code = "REQUEST_LIMIT_EXCEEDED"
    http_status = 429

    def __init__(self, message: str, retry_after_seconds: float = 1.0):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class UpstreamFailure(SqlinferError):
    """A model or provider failed to answer (5xx); the status is the failure's own."""

    error_code = "INTERNAL_ERROR"

    def __init__(self, message: str, http_status: int = 500):
        super().__init__(message)
        self.http_status = http_status


def row_error(message: str, status: int | None) -> SqlinferError:
    """A failed answer as the error its status calls for (429 limit, 5xx upstream, else 400)."""
    if status == 429:
        return RequestLimitExceeded(message)
    if status is not None and status >= 500:
        return UpstreamFailure(message, status)
    return InvalidParameterValue(message)
