"""The one error tree of sqlinfer.

Every error a user can see derives from :class:`SqlinferError` and carries a stable
``error_code`` (Databricks' codes, so REST clients that branch on them keep working) and the
HTTP status the REST layer answers with. It lives in ``engine`` because that is the bottom of
the dependency chain (``connectors -> ai_functions -> serving -> engine``): every layer can
raise and catch the same classes.

A message says what was wrong, the offending value, and how to fix it. Messages never contain
secret values: callers pass references (``{{secrets/scope/key}}``), never resolved secrets.
"""

from __future__ import annotations


class SqlinferError(Exception):
    """Base of every user-facing error."""

    error_code = "INTERNAL_ERROR"
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        """The Databricks REST error body."""
        return {"error_code": self.error_code, "message": self.message}


class InvalidParameterValue(SqlinferError):
    """A request or config value is wrong; the message names the field and the value."""

    error_code = "INVALID_PARAMETER_VALUE"
    http_status = 400


class GuardrailBlocked(SqlinferError):
    """An AI Gateway guardrail of the endpoint (``ai_gateway.guardrails``) refused a request or an
    answer: PII under ``pii.behavior: BLOCK``, or an invalid keyword. The message names the kind of
    PII (or the keyword) and where it was found, never the PII itself. ``guardrail`` is what the
    usage table records, e.g. ``input.pii BLOCK (email)``."""

    error_code = "GUARDRAIL_BLOCKED"
    http_status = 400

    def __init__(self, message: str, guardrail: str | None = None):
        super().__init__(message)
        self.guardrail = guardrail


class ResourceDoesNotExist(SqlinferError):
    """A named endpoint, model, scope or key does not exist."""

    error_code = "RESOURCE_DOES_NOT_EXIST"
    http_status = 404


class ResourceAlreadyExists(SqlinferError):
    error_code = "RESOURCE_ALREADY_EXISTS"
    http_status = 409


class ResourceConflict(SqlinferError):
    """The resource is in a state that refuses this now (an update already in progress)."""

    error_code = "RESOURCE_CONFLICT"
    http_status = 409


class NotImplementedFeature(SqlinferError):
    """A documented Databricks field or feature that sqlinfer does not implement (yet); refused by
    name rather than accepted and ignored."""

    error_code = "NOT_IMPLEMENTED"
    http_status = 501


class RequestCancelled(SqlinferError):
    """The caller went away (its connection closed) before the work finished; the rest was not done.
    Nobody usually reads this error: it ends the work."""

    error_code = "CANCELLED"
    http_status = 499


class TemporarilyUnavailable(SqlinferError):
    """A server, provider or engine that should answer cannot right now; retrying later may work.

    ``retry_after_seconds`` becomes the ``Retry-After`` header when it is known.
    """

    error_code = "TEMPORARILY_UNAVAILABLE"
    http_status = 503

    def __init__(self, message: str, retry_after_seconds: float | None = None):
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ModelUnavailable(SqlinferError):
    """A model exists by name but cannot be loaded here (missing package, broken directory): a
    problem of this installation, not of the request."""

    error_code = "MODEL_UNAVAILABLE"
    http_status = 503


class EngineError(SqlinferError):
    """The local inference engine failed to start or died while answering; retriable, and a
    fallback entity is tried as for an upstream 5xx."""

    error_code = "ENGINE_UNAVAILABLE"
    http_status = 503


class ResourceExhausted(SqlinferError):
    """Capacity this machine does not have: a provisioned entity asks for more CPU cores (model
    units) than are free. Databricks' code and status for exhausted capacity."""

    error_code = "RESOURCE_EXHAUSTED"
    http_status = 429
