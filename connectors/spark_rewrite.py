"""The typed rewrite behind :func:`connectors.spark.sql`: a SQL function of its own, of exactly the
right type, for every AI function call whose type-fixing arguments are constants.

A Spark SQL function has one result type, fixed when it is registered, so the functions that
``register`` adds return STRING where the type depends on arguments (``ai_query``'s returnType,
``ai_extract``'s labels, ``ai_classify``'s ``multilabel``). This module reads the query with
sqlglot's Spark tokenizer (so comments, strings and nested calls are never mistaken for calls),
registers a function per distinct type and renames the calls; the rest of the query is passed to
Spark as written. Constant task-function arguments are also checked here, on the driver, so a bad
one fails before any job starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator

from ai_functions.errors import InvalidArgument
from ai_functions.functions import ai_query_batch
from ai_functions.spec import OutputSpec, output_spec
from connectors.spark import ClientConfig, _client, _json_texts, _requests
from serving.data.result_store import default_store


def rewrite(spark: Any, query: str, config: ClientConfig) -> str:
    """``query`` with every typed call renamed (ai_query first, then the task functions)."""
    return _rewrite_tasks(spark, _rewrite(spark, query, config), config)


_NAMES = ("endpoint", "request", "returnType", "failOnError", "modelParameters", "responseFormat")
_NOT_LITERAL = object()


@dataclass(frozen=True)
class _Call:
    """One ``ai_query(...)`` in a query: where it is, and its arguments' text by parameter name."""

    start: int  # offset of ``ai_query``
    end: int  # offset just past its ``)``
    arguments: dict[str, str]
    literals: dict[str, Any]  # the constant returnType/responseFormat/failOnError values


def _rewrite(spark: Any, query: str, config: ClientConfig) -> str:
    """``query`` with every ``ai_query`` call whose result-type arguments are constants replaced by
    a call of a function registered with exactly that type. The query is read with sqlglot's Spark
    tokenizer, so strings, comments and nested calls are never mistaken for calls or commas; the
    rest of the text is kept as the user wrote it."""
    out, position = [], 0
    for call in _calls(query):
        if call.start < position:
            continue
        if any(v is _NOT_LITERAL for v in call.literals.values()) or not {"endpoint", "request"} <= set(call.arguments):
            continue
        spec = output_spec(call.literals.get("returnType"), call.literals.get("responseFormat"),
                           call.literals.get("failOnError", True))
        name = _typed_function(spark, spec, config)
        request = _rewrite(spark, call.arguments["request"], config)  # an ai_query inside the request
        parameters = call.arguments.get("modelParameters", "CAST(NULL AS STRING)")
        out.append(query[position:call.start])
        out.append(f"{name}({call.arguments['endpoint']}, {request}, {parameters})")
        position = call.end
    out.append(query[position:])
    return "".join(out)


def _calls(query: str, function: str = "ai_query", names: tuple[str, ...] = _NAMES,
           typed: tuple[str, ...] = ("returnType", "responseFormat", "failOnError")) -> Iterator[_Call]:
    from sqlglot.dialects.spark import Spark
    from sqlglot.tokens import TokenType

    tokens = Spark().tokenize(query)
    for index, token in enumerate(tokens):
        if token.text.lower() != function or index + 1 >= len(tokens) or tokens[index + 1].token_type != TokenType.L_PAREN:
            continue
        depth, groups, current = 0, [], []
        for inner in tokens[index + 2:]:
            kind = inner.token_type
            if kind in (TokenType.L_PAREN, TokenType.L_BRACKET):
                depth += 1
            elif kind in (TokenType.R_PAREN, TokenType.R_BRACKET):
                if depth == 0:
                    groups.append(current)
                    break
                depth -= 1
            elif kind == TokenType.COMMA and depth == 0:
                groups.append(current)
                current = []
                continue
            current.append(inner)
        else:
            continue  # unbalanced: leave it to Spark's parser to report
        arguments, literals = {}, {}
        for position, group in enumerate(g for g in groups if g):
            if len(group) > 2 and group[1].token_type in (TokenType.FARROW, TokenType.COLON_EQ):
                name = next((n for n in names if n.lower() == group[0].text.lower()), None)
                if name is None:
                    raise InvalidArgument(f"{function} has no argument {group[0].text!r}; its arguments: {', '.join(names)}")
                group = group[2:]
            elif position < len(names):
                name = names[position]
            else:
                raise InvalidArgument(f"{function} takes at most {len(names)} arguments: {', '.join(names)}")
            arguments[name] = query[group[0].start:group[-1].end + 1]
            if name in typed:
                literals[name] = _literal(group)
        yield _Call(token.start, inner.end + 1, arguments, literals)


def _rewrite_tasks(spark: Any, query: str, config: ClientConfig) -> str:
    """``query`` with each ai_extract / ai_classify call whose type-fixing arguments (labels,
    options) are constants renamed to a function of its exact type (STRUCT, ARRAY<STRING>)."""
    from ai_functions.tasks import compile_task
    from connectors.spark_tasks import SIGNATURES, TYPED_BY, typed_function

    for function, (values, arguments) in SIGNATURES.items():  # constant arguments are checked here, on the driver
        for call in _calls(query, function, values + arguments + ("endpoint",), ()):
            constants = {name: _constant(spark, call.arguments[name]) for name in arguments if name in call.arguments}
            if not any(v is _NOT_LITERAL for v in constants.values()):
                compile_task(function, {k: v for k, v in constants.items() if v is not None})
    for function, deciding in TYPED_BY.items():
        values, arguments = SIGNATURES[function]
        out, position = [], 0
        for call in _calls(query, function, values + arguments + ("endpoint",), ()):
            constants = {name: _constant(spark, call.arguments[name]) for name in deciding if name in call.arguments}
            if any(v is _NOT_LITERAL for v in constants.values()) or call.start < position:
                continue
            out.append(query[position:call.start])
            out.append(typed_function(spark, function, constants, config))
            position = call.start + len(function)
        out.append(query[position:])
        query = "".join(out)
    return query


def _constant(spark: Any, text: str) -> Any:
    """The value of a constant SQL expression (an ARRAY(...), a map(...), a literal), evaluated
    on the driver; _NOT_LITERAL when it needs a row (a column)."""
    try:
        [row] = spark.sql(f"SELECT to_json(named_struct('v', {text})) AS j").collect()
    except Exception:  # noqa: BLE001  (a column reference, or not an expression Spark can fold: left as it is)
        return _NOT_LITERAL
    from connectors.spark_tasks import _python

    value = json.loads(row["j"]).get("v")
    return _python(value)


def _literal(group: list[Any]) -> Any:
    """The constant an argument's tokens spell, or _NOT_LITERAL (a column, an expression)."""
    from sqlglot.tokens import TokenType

    kinds = {token.token_type for token in group}
    if kinds == {TokenType.STRING}:
        return "".join(token.text for token in group)  # Spark joins adjacent string literals
    if len(group) == 1 and group[0].token_type in (TokenType.TRUE, TokenType.FALSE):
        return group[0].token_type == TokenType.TRUE
    if len(group) == 1 and group[0].token_type == TokenType.NULL:
        return None
    return _NOT_LITERAL


def _typed_function(spark: Any, spec: OutputSpec, config: ClientConfig) -> str:
    """A function named after its spec, returning exactly its type (registered once per session)."""
    from pyspark.sql.functions import arrow_udf

    digest = hashlib.sha1(repr((spec.result.ddl(), spec.schema_text, spec.fail_on_error)).encode()).hexdigest()[:12]
    name = f"__sqlinfer_ai_query_{digest}"

    @arrow_udf(spec.spark_ddl())
    def typed(endpoint, request, modelParameters):  # noqa: N803
        return ai_query_batch(_client(config), endpoint, _requests(request), _json_texts(modelParameters), spec=spec, store=default_store())

    spark.udf.register(name, typed)
    return name
