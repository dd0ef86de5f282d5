"""Errors of the SQL functions: Databricks' AI Functions error classes, in the shared tree.

Each class has its own stable ``error_code`` (the Databricks error class, so users can search it)
and HTTP status (for the REST routes that run the same functions). Messages start with
``[ERROR_CLASS]`` so that the class shows in a SQL engine's own error text too.
"""

from __future__ import annotations

from engine.errors import SqlinferError


class _Classified(SqlinferError):
    def __init__(self, message: str):
        super().__init__(f"[{self.error_code}] {message}")


class InvalidModelParameters(_Classified):
    """modelParameters refused before any call: a reserved name, a bad value or type, or a name the
    endpoint does not take."""

    error_code = "AI_FUNCTION_INVALID_MODEL_PARAMETERS"
    http_status = 400


class InvalidArgument(_Classified):
    """Any other argument of an AI function is wrong (returnType, responseFormat, failOnError, the
    request's type, an endpoint of the wrong kind); refused before any call."""

    error_code = "AI_FUNCTION_INVALID_ARGUMENT"
    http_status = 400


class InvalidMaxWords(_Classified):
    """``ai_summarize``'s max_words is negative or not an integer (Databricks' own error class)."""

    error_code = "AI_FUNCTION_INVALID_MAX_WORDS"
    http_status = 400


class BudgetExceeded(_Classified):
    """``--max-cost`` / ``--max-tokens``: refused before running, or stopped while running."""

    error_code = "AI_FUNCTION_BUDGET_EXCEEDED"
    http_status = 400


class _RowError(_Classified):
    def __init__(self, function: str, endpoint: str, request: str, reason: str):
        shown = request if len(request) <= 80 else request[:77] + "..."
        super().__init__(f"{function} failed on endpoint {endpoint!r} for request {shown!r}: {reason}")
        self.endpoint, self.request, self.reason = endpoint, request, reason


class RowFailed(_RowError):
    """With failOnError => true, the first row the model or provider could not answer fails the
    query (its reason says why: a refused request, a limit, an unavailable upstream)."""

    error_code = "AI_FUNCTION_ROW_FAILED"
    http_status = 502


class CastError(_RowError):
    """With failOnError => true, the first answer that does not fit returnType/responseFormat (after
    the repair attempts) fails the query."""

    error_code = "AI_FUNCTION_HTTP_PARSE_CAST_ERROR"
    http_status = 422
