"""Errors of the SQL functions, in the shared tree (``engine.errors``).

``error_class`` mirrors the Databricks AI Functions error classes so users can search them;
``error_code``/``http_status`` come from the shared tree for the REST layer.
"""

from __future__ import annotations

from engine.errors import InvalidParameterValue, SqlinferError


class InvalidModelParameters(InvalidParameterValue):
    """modelParameters refused before any call (Databricks: AI_FUNCTION_INVALID_MODEL_PARAMETERS)."""

    error_class = "AI_FUNCTION_INVALID_MODEL_PARAMETERS"

    def __init__(self, message: str):
        super().__init__(f"[{self.error_class}] {message}")


class RowFailed(SqlinferError):
    """With failOnError => true, the first row that failed fails the whole query."""

    error_code = "INTERNAL_ERROR"
    error_class = "AI_FUNCTION_ROW_FAILED"

    def __init__(self, function: str, endpoint: str, request: str, reason: str):
        shown = request if len(request) <= 80 else request[:77] + "..."
        super().__init__(
            f"[{self.error_class}] {function} failed on endpoint {endpoint!r} for request {shown!r}: "
            f"{reason}"
        )
        self.endpoint, self.request, self.reason = endpoint, request, reason
