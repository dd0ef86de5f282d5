"""``returnType`` / ``responseFormat`` types: Databricks DDL in, every engine's type out.

One small type tree (:class:`SqlType`) is parsed once from the DDL users write
(``'STRUCT<label: STRING, score: DOUBLE>'``, ``'ARRAY<FLOAT>'``...) or from a JSON Schema, and
rendered for whoever needs it: Arrow (Spark's Arrow UDFs), DuckDB's ``json_transform`` structure,
Spark DDL, and a JSON Schema for structured output (vLLM guided decoding, OpenAI
``response_format``). :func:`coerce` checks a decoded answer against the type and converts it,
naming the path that does not fit (``$.score: expected DOUBLE, got 'high'``), so a row is either
typed correctly or fails with a reason — never silently NULL.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ai_functions.errors import InvalidArgument

# DDL name -> canonical scalar kind
SCALARS = {
    "STRING": "STRING", "VARCHAR": "STRING", "TEXT": "STRING",
    "FLOAT": "FLOAT", "REAL": "FLOAT", "DOUBLE": "DOUBLE",
    "INT": "INT", "INTEGER": "INT", "BIGINT": "BIGINT", "LONG": "BIGINT",
    "SMALLINT": "SMALLINT", "SHORT": "SMALLINT", "TINYINT": "TINYINT", "BYTE": "TINYINT",
    "BOOLEAN": "BOOLEAN", "BOOL": "BOOLEAN",
}
INTEGER_RANGES = {"TINYINT": 2**7, "SMALLINT": 2**15, "INT": 2**31, "BIGINT": 2**63}
DUCKDB_NAMES = {"STRING": "VARCHAR", "FLOAT": "FLOAT", "DOUBLE": "DOUBLE", "INT": "INTEGER", "BIGINT": "BIGINT",
                "SMALLINT": "SMALLINT", "TINYINT": "TINYINT", "BOOLEAN": "BOOLEAN"}


@dataclass(frozen=True)
class SqlType:
    kind: str  # a SCALARS value, "ARRAY" or "STRUCT"
    element: "SqlType | None" = None
    fields: tuple[tuple[str, "SqlType"], ...] = ()

    # -- renderings ------------------------------------------------------------------------

    def ddl(self) -> str:
        if self.kind == "ARRAY":
            return f"ARRAY<{self.element.ddl()}>"
        if self.kind == "STRUCT":
            return "STRUCT<" + ", ".join(f"{_quote(n)}: {t.ddl()}" for n, t in self.fields) + ">"
        return self.kind

    def arrow(self) -> Any:
        import pyarrow as pa

        if self.kind == "ARRAY":
            return pa.list_(self.element.arrow())
        if self.kind == "STRUCT":
            return pa.struct([(n, t.arrow()) for n, t in self.fields])
        return {"STRING": pa.string(), "FLOAT": pa.float32(), "DOUBLE": pa.float64(), "INT": pa.int32(),
                "BIGINT": pa.int64(), "SMALLINT": pa.int16(), "TINYINT": pa.int8(), "BOOLEAN": pa.bool_()}[self.kind]

    def duckdb_structure(self) -> Any:
        """The ``json_transform`` structure that yields this type in DuckDB."""
        if self.kind == "ARRAY":
            return [self.element.duckdb_structure()]
        if self.kind == "STRUCT":
            return {n: t.duckdb_structure() for n, t in self.fields}
        return DUCKDB_NAMES[self.kind]

    def json_schema(self) -> dict[str, Any]:
        if self.kind == "ARRAY":
            return {"type": "array", "items": self.element.json_schema()}
        if self.kind == "STRUCT":
            return {"type": "object", "properties": {n: t.json_schema() for n, t in self.fields},
                    "required": [n for n, _ in self.fields], "additionalProperties": False}
        if self.kind == "STRING":
            return {"type": "string"}
        if self.kind == "BOOLEAN":
            return {"type": "boolean"}
        return {"type": "integer"} if self.kind in INTEGER_RANGES else {"type": "number"}


STRING = SqlType("STRING")


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"`{name}`"


# -- parsing DDL -----------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(`(?:[^`]|``)*`)|([A-Za-z_][A-Za-z0-9_]*)|([<>,:()])|(\S))")


@lru_cache(maxsize=256)
def parse_type(ddl: str, argument: str = "returnType") -> SqlType:
    """``'STRUCT<label: STRING, score: DOUBLE>'`` -> SqlType; a clear error names what is wrong."""
    tokens: list[str] = []
    for match in _TOKEN.finditer(ddl):
        quoted, word, symbol, other = match.groups()
        if other:
            raise InvalidArgument(f"{argument} {ddl!r}: unexpected {other!r}; write a type such as "
                                        f"'STRING', 'DOUBLE', 'ARRAY<STRING>' or 'STRUCT<label: STRING, score: DOUBLE>'")
        tokens.append(quoted or word or symbol)
    position = 0

    def fail(expected: str) -> InvalidArgument:
        found = repr(tokens[position]) if position < len(tokens) else "the end"
        return InvalidArgument(f"{argument} {ddl!r}: expected {expected}, found {found}")

    def take(expected: str) -> str:
        nonlocal position
        if position >= len(tokens) or tokens[position].upper() != expected:
            raise fail(repr(expected))
        position += 1
        return expected

    def parse() -> SqlType:
        nonlocal position
        if position >= len(tokens):
            raise fail("a type")
        word = tokens[position].upper()
        position += 1
        if word == "ARRAY":
            take("<")
            element = parse()
            take(">")
            return SqlType("ARRAY", element=element)
        if word == "STRUCT":
            take("<")
            fields: list[tuple[str, SqlType]] = []
            while True:
                if position >= len(tokens):
                    raise fail("a field name")
                name = tokens[position]
                if name in "<>,:()":
                    raise fail("a field name")
                name = name[1:-1].replace("``", "`") if name.startswith("`") else name
                position += 1
                if position < len(tokens) and tokens[position] == ":":
                    position += 1
                if any(existing == name for existing, _ in fields):
                    raise InvalidArgument(f"{argument} {ddl!r}: field {name!r} appears twice")
                fields.append((name, parse()))
                if position < len(tokens) and tokens[position] == ",":
                    position += 1
                    continue
                take(">")
                return SqlType("STRUCT", fields=tuple(fields))
        if word in ("DECIMAL", "NUMERIC", "DATE", "TIMESTAMP", "BINARY", "MAP", "VARIANT", "INTERVAL"):
            raise InvalidArgument(
                f"{argument} {ddl!r}: {word} is not supported; use STRING, a number type (FLOAT, DOUBLE, INT, BIGINT...), "
                f"BOOLEAN, ARRAY<...> or STRUCT<...>"
            )
        if word not in SCALARS:
            position -= 1
            raise fail("a type (STRING, FLOAT, DOUBLE, INT, BIGINT, BOOLEAN, ARRAY<...>, STRUCT<...>)")
        if position < len(tokens) and tokens[position] == "(":  # VARCHAR(20): the length is not kept
            while position < len(tokens) and tokens[position] != ")":
                position += 1
            take(")")
        return SqlType(SCALARS[word])

    result = parse()
    if position != len(tokens):
        raise fail("the end of the type")
    return result


def from_json_schema(schema: Any, path: str = "responseFormat.json_schema.schema") -> SqlType:
    """The SQL type a JSON Schema describes (objects become STRUCTs, in property order)."""
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{path} must be a JSON Schema object")
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: nullable is every SQL type's default
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        if not properties:
            return STRING  # a free-form object: kept as JSON text
        return SqlType("STRUCT", fields=tuple((name, from_json_schema(sub, f"{path}.properties.{name}"))
                                              for name, sub in properties.items()))
    if kind == "array":
        return SqlType("ARRAY", element=from_json_schema(schema.get("items") or {"type": "string"}, f"{path}.items"))
    return {"string": STRING, "number": SqlType("DOUBLE"), "integer": SqlType("BIGINT"),
            "boolean": SqlType("BOOLEAN")}.get(kind, STRING)


# -- checking answers ------------------------------------------------------------------------


def coerce(value: Any, sql_type: SqlType, path: str = "$") -> Any:
    """``value`` (decoded JSON) as ``sql_type``; ValueError names the path that does not fit."""
    if value is None:
        return None
    kind = sql_type.kind
    if kind == "STRING":
        return value if isinstance(value, str) else json.dumps(value)
    if kind == "BOOLEAN":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"{path}: expected BOOLEAN, got {_show(value)}")
    if kind in ("FLOAT", "DOUBLE"):
        if isinstance(value, str):
            value = _number(value, path, kind)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: expected {kind}, got {_show(value)}")
        return float(value)
    if kind in INTEGER_RANGES:
        if isinstance(value, str):
            value = _number(value, path, kind)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected {kind}, got {_show(value)}")
        limit = INTEGER_RANGES[kind]
        if not -limit <= value < limit:
            raise ValueError(f"{path}: {value} does not fit in {kind}")
        return value
    if kind == "ARRAY":
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected an array ({sql_type.ddl()}), got {_show(value)}")
        return [coerce(item, sql_type.element, f"{path}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected an object ({sql_type.ddl()}), got {_show(value)}")
    names = {name for name, _ in sql_type.fields}
    extra = sorted(set(value) - names)
    if extra:
        raise ValueError(f"{path}: unexpected field(s) {', '.join(map(repr, extra))}; {sql_type.ddl()} has {', '.join(sorted(names))}")
    return {name: coerce(value.get(name), field, f"{path}.{name}") for name, field in sql_type.fields}


def parse_text(text: str, sql_type: SqlType) -> Any:
    """A model's text answer as ``sql_type``: STRING as is, anything else read as JSON (a
    fenced ```json block or surrounding prose is tolerated), then checked."""
    if sql_type.kind == "STRING":
        return text
    stripped = text.strip()
    if sql_type.kind in ("ARRAY", "STRUCT"):
        opener = "[" if sql_type.kind == "ARRAY" else "{"
        start = stripped.find(opener)
        if start < 0:
            raise ValueError(f"expected JSON for {sql_type.ddl()}, got {_show(text)}")
        try:
            value, _ = json.JSONDecoder().raw_decode(stripped[start:])
        except json.JSONDecodeError as exc:
            raise ValueError(f"the answer is not valid JSON for {sql_type.ddl()} ({exc.msg}): {_show(text)}") from None
        return coerce(value, sql_type)
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        value = stripped
    return coerce(value, sql_type)


def _number(text: str, path: str, kind: str) -> float | int:
    match = re.fullmatch(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*", text)
    if match is None:
        raise ValueError(f"{path}: expected {kind}, got {_show(text)}")
    number = float(text)
    return int(number) if kind in INTEGER_RANGES and number.is_integer() else number


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
