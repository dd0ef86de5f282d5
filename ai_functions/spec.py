"""What one ``ai_query`` call returns: its result type, structured output, and failOnError.

Decided once per distinct (returnType, responseFormat, failOnError), before any row is sent —
by DuckDB while it binds the query, by Spark when the UDF is built — so a bad type fails the
query up front with the argument named. The decisions (documented in the README):

* ``responseFormat`` (``json_object``, a ``json_schema``, or a STRUCT DDL) goes to the model as
  structured output and comes back typed: a STRUCT for a schema or DDL, JSON text (STRING) for
  ``json_object``.
* ``returnType`` types the answer. A STRUCT returnType on a chat/completions endpoint is also
  sent as structured output, so the model is held to the shape it must have; scalar and ARRAY
  types are read from the text (JSON, or a bare number/boolean).
* ``failOnError => false`` wraps the type: ``STRUCT<result: <type>, errorMessage: STRING>``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ai_functions.types import DUCKDB_NAMES, STRING, SqlType, from_json_schema, parse_type
from ai_functions.errors import InvalidArgument


@dataclass(frozen=True)
class OutputSpec:
    result: SqlType
    json_schema: dict[str, Any] | None  # structured output requested from the model, if any
    fail_on_error: bool
    detailed: bool = False  # the extended form: result, errorMessage and where the answer came from
    choice: tuple[str, ...] | None = None  # the answer is exactly one of these (the task functions' label sets)

    @property
    def schema_text(self) -> str | None:
        return json.dumps(self.json_schema, sort_keys=True) if self.json_schema is not None else None

    def duckdb_structure(self) -> str:
        """The ``json_transform`` structure of the whole column (result, or result + errorMessage)."""
        inner = self.result.duckdb_structure()
        if self.detailed:
            return json.dumps({"result": inner, "errorMessage": "VARCHAR"} | {n: DUCKDB_NAMES[k] for n, k in PROVENANCE})
        return json.dumps(inner if self.fail_on_error else {"result": inner, "errorMessage": "VARCHAR"})

    def arrow(self) -> Any:
        import pyarrow as pa

        inner = self.result.arrow()
        if self.detailed:
            return pa.struct([("result", inner), ("errorMessage", pa.string())] + [(n, SqlType(k).arrow()) for n, k in PROVENANCE])
        return inner if self.fail_on_error else pa.struct([("result", inner), ("errorMessage", pa.string())])

    def spark_ddl(self) -> str:
        inner = self.result.ddl()
        if self.detailed:
            return f"STRUCT<result: {inner}, errorMessage: STRING, " + ", ".join(f"{n}: {k}" for n, k in PROVENANCE) + ">"
        return inner if self.fail_on_error else f"STRUCT<result: {inner}, errorMessage: STRING>"


# The extended form's provenance fields, after result and errorMessage.
PROVENANCE = (("raw_text", "STRING"), ("attempts", "INT"), ("served_entity", "STRING"), ("cache_hit", "BOOLEAN"),
              ("input_tokens", "BIGINT"), ("output_tokens", "BIGINT"))


@lru_cache(maxsize=256)
def output_spec(return_type: str | None = None, response_format: str | None = None, fail_on_error: bool | None = True,
                detailed: bool = False) -> OutputSpec:
    if detailed:
        return dataclasses.replace(output_spec(return_type, response_format, False), detailed=True)
    fail = True if fail_on_error is None else bool(fail_on_error)
    if response_format not in (None, ""):
        if return_type not in (None, ""):
            raise InvalidArgument(
                "give returnType or responseFormat, not both: responseFormat already fixes the result's type"
            )
        result, schema = _response_format(response_format)
        return OutputSpec(result, schema, fail)
    if return_type in (None, ""):
        return OutputSpec(STRING, None, fail)
    result = parse_type(return_type, "returnType")
    return OutputSpec(result, result.json_schema() if result.kind == "STRUCT" else None, fail)


def _response_format(text: str) -> tuple[SqlType, dict[str, Any]]:
    if not text.lstrip().startswith("{"):
        result = parse_type(text, "responseFormat")
        if result.kind != "STRUCT":
            raise InvalidArgument(
                f"responseFormat {text!r} must be a STRUCT<...> DDL or a JSON object such as "
                f"'{{\"type\": \"json_object\"}}'; use returnType for a scalar or ARRAY result"
            )
        return result, result.json_schema()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"responseFormat is not valid JSON ({exc.msg}): {text!r}") from None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_object":
        return STRING, {"type": "object"}
    if kind == "json_schema":
        schema = (spec.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidArgument("responseFormat.json_schema.schema is required: the JSON Schema the answer must follow")
        return from_json_schema(schema), schema
    raise InvalidArgument(
        f"responseFormat.type must be 'json_object' or 'json_schema', got {kind!r}; or give a STRUCT<...> DDL"
    )
