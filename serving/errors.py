"""The error taxonomy of the serving layer: the shared tree (``engine.errors``) plus the API's own.

Every class has one stable ``error_code`` and one HTTP status; the REST layer answers each as
``{"error_code", "message"}`` (OpenAI's ``{"error": {...}}`` on the OpenAI routes). Whose fault
an error is decides its class: the caller's input is a 4xx naming the field, a provider that
refuses our credentials is ``UPSTREAM_AUTHENTICATION_FAILED`` (not the caller's fault), a provider
or engine that cannot answer now is a retriable 503, and ``INTERNAL_ERROR`` is left for bugs in
sqlinfer. The README's error table lists every class.
"""

from __future__ import annotations

from engine.errors import (  # noqa: F401  (re-exported: the serving layer's one import site)
    EngineError,
    GuardrailBlocked,
    InvalidParameterValue,
    ModelUnavailable,
    NotImplementedFeature,
    RequestCancelled,
    ResourceAlreadyExists,
    ResourceConflict,
    ResourceDoesNotExist,
    ResourceExhausted,
    SqlinferError,
    TemporarilyUnavailable,
)


class MalformedRequest(SqlinferError):
    """The body is not JSON, or not the JSON object the route takes."""

    error_code = "MALFORMED_REQUEST"
    http_status = 400


class RequestTooLarge(SqlinferError):
    """The body is larger than the server accepts (``SQLINFER_MAX_BODY_BYTES``)."""

    error_code = "REQUEST_TOO_LARGE"
    http_status = 413


class Unauthenticated(SqlinferError):
    error_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(SqlinferError):
    error_code = "PERMISSION_DENIED"
    http_status = 403


class NoSuchRoute(SqlinferError):
    """No API at this path (Databricks answers unknown REST paths with this code too)."""

    error_code = "ENDPOINT_NOT_FOUND"
    http_status = 404


class MethodNotAllowed(SqlinferError):
    error_code = "METHOD_NOT_ALLOWED"
    http_status = 405


class RequestLimitExceeded(SqlinferError):
    error_code = "REQUEST_LIMIT_EXCEEDED"
    http_status = 429

    def __init__(self, message: str, retry_after_seconds: float = 1.0):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class UpstreamAuthenticationFailed(SqlinferError):
    """The provider refused the endpoint's credentials (HTTP 401/403): the endpoint's key is wrong
    or revoked. Not the caller's fault, and not fixed by retrying; whoever manages the endpoint's
    secret must fix it."""

    error_code = "UPSTREAM_AUTHENTICATION_FAILED"
    http_status = 502


class SecretKeyUnavailable(SqlinferError):
    """The server's secret key file is missing or corrupt while encrypted values need it."""

    error_code = "SECRET_KEY_UNAVAILABLE"
    http_status = 503


def row_error(message: str, status: int | None, code: str | None = None) -> SqlinferError:
    """A failed answer as the error its code or status calls for.

    ``GUARDRAIL_BLOCKED`` (a row an AI Gateway guardrail refused): that class; 429: the caller's (or
    provider's) rate limit; 401/403: the provider refused our credentials; 5xx: the provider or
    engine could not answer (retriable); other 4xx or unknown: the request itself was refused.
    """
    if code == GuardrailBlocked.error_code:
        return GuardrailBlocked(message)
    if status == 429:
        return RequestLimitExceeded(message)
    if status in (401, 403):
        return UpstreamAuthenticationFailed(message)
    if status is not None and status >= 500:
        return TemporarilyUnavailable(message)
    return InvalidParameterValue(message)
