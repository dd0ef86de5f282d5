"""``ai_query`` and ``ai_embed`` for Spark: SQL functions and a DataFrame API.

Three ways in::

    from connectors import spark as sqlinfer_spark
    sqlinfer_spark.register(spark, url="http://127.0.0.1:8080", token="sqli_...")
    spark.sql("SELECT ai_query('system-smollm2-135m-instruct', review, failOnError => false) FROM reviews")
    sqlinfer_spark.sql(spark, "SELECT ai_query('e', q, returnType => 'STRUCT<label: STRING, score: DOUBLE>') ...")
    df.select(sqlinfer_spark.ai_query("e", "review", returnType="FLOAT"))

Executors never receive an engine or an SDK client: a UDF's closure holds only a
:class:`ClientConfig` (a URL and a token), and each Python worker builds an
:class:`~serving.data.http_client.HttpServingClient` from it once. Every batch goes to ``sqlinfer
serve`` in one request, so all executors share one engine, one set of rate limits and one usage
log. Without a URL (``local[*]`` and external endpoints only) each worker serves in-process.

Types. A SQL function has one result type, fixed when it is registered, so ``ai_query`` as
registered with :func:`register` returns STRING: the answer, or — with ``returnType``,
``responseFormat`` or ``failOnError => false`` — the validated value as JSON text. For typed
results run the query through :func:`sql`, which gives each ``ai_query`` call with literal
arguments a function of its own, typed exactly as in DuckDB (``STRUCT<result, errorMessage>``
included); the DataFrame API is typed always. All execution is Arrow-based (``arrow_udf``): the
SQL functions receive each Arrow batch whole, the DataFrame API a task's whole partition.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterator

from ai_functions.functions import ai_embed_batch, ai_query_batch, ai_query_json
from ai_functions.result_store import default_store
from ai_functions.spec import OutputSpec, output_spec
from engine.errors import InvalidParameterValue


@dataclass(frozen=True)
class ClientConfig:
    """What an executor needs to reach the serving layer (picklable; no live objects)."""

    url: str | None = None
    token: str | None = None


_CLIENTS: dict[ClientConfig, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(config: ClientConfig) -> Any:
    """This Python worker's client for ``config``, built once and reused by later tasks."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(config)
        if client is None:
            if config.url:
                from serving.data.http_client import HttpServingClient

                client = HttpServingClient(config.url, config.token)
            else:
                from serving.data.client import InProcessClient

                client = InProcessClient()
            _CLIENTS[config] = client
        return client


def _plain(value: Any) -> Any:
    """Spark values as JSON-able Python: a SQL literal such as 9.0 or 5.1 arrives as a Decimal."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and "." not in str(value) else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _requests(array: Any) -> list[Any]:
    return [_plain(v) for v in array.to_pylist()]


def _json_texts(array: Any) -> list[str | None]:
    """modelParameters (a struct column or JSON text) as JSON text per row."""
    if array is None:
        return None
    values = array.to_pylist()
    return [None if v is None else v if isinstance(v, str) else json.dumps(_plain(v)) for v in values]


def _scalar(array: Any) -> Any:
    """The value of a constant argument column (the first non-NULL value), or None."""
    if array is None:
        return None
    for value in array.to_pylist():
        if value is not None:
            return value
    return None


# -- Spark SQL ---------------------------------------------------------------------------------


def register(spark: Any, url: str | None = None, token: str | None = None) -> ClientConfig:
    """Add ``ai_query`` and ``ai_embed`` to ``spark``'s SQL, with named arguments.

    ``url``/``token`` default to the session settings ``spark.sqlinfer.url`` and
    ``spark.sqlinfer.token``.
    """
    from pyspark.sql.functions import arrow_udf

    config = ClientConfig(url or spark.conf.get("spark.sqlinfer.url", None) or None,
                          token or spark.conf.get("spark.sqlinfer.token", None) or None)

    @arrow_udf("string")
    def ai_query(endpoint, request, returnType=None, failOnError=None, modelParameters=None, responseFormat=None):  # noqa: N803
        import pyarrow as pa

        spec = output_spec(_scalar(returnType), _scalar(responseFormat), _scalar(failOnError))
        answers = ai_query_json(_client(config), endpoint, _requests(request), _json_texts(modelParameters), spec, store=default_store())
        return pa.array(answers, pa.string())

    @arrow_udf("array<float>")
    def ai_embed(endpoint, text):
        return ai_embed_batch(_client(config), endpoint, text, store=default_store())

    spark.udf.register("ai_query", ai_query)
    spark.udf.register("ai_embed", ai_embed)
    spark.conf.set("spark.sqlinfer.registered", "true")
    _REGISTERED[id(spark)] = config
    return config


_REGISTERED: dict[int, ClientConfig] = {}


def sql(spark: Any, query: str) -> Any:
    """``spark.sql(query)`` with typed ``ai_query`` results.

    Each ``ai_query(...)`` call whose ``returnType``, ``responseFormat`` and ``failOnError`` are
    literals (positional or named) is given its own function, registered with the exact result
    type — the same type DuckDB gives. Other calls are left to the registered STRING function.
    """
    config = _REGISTERED.get(id(spark)) or register(spark)
    return spark.sql(_rewrite(spark, query, config))


_NAMES = ("endpoint", "request", "returnType", "failOnError", "modelParameters", "responseFormat")


def _rewrite(spark: Any, query: str, config: ClientConfig) -> str:
    out, position = [], 0
    for match in re.finditer(r"\bai_query\s*\(", query, flags=re.IGNORECASE):
        if match.start() < position:
            continue
        start = match.end()
        end, arguments = _split_arguments(query, start)
        if end is None:
            break
        bound = _bind(arguments)
        literal = {k: _literal(bound[k]) for k in ("returnType", "responseFormat", "failOnError") if k in bound}
        if any(v is _NOT_LITERAL for v in literal.values()) or "endpoint" not in bound or "request" not in bound:
            continue
        spec = output_spec(literal.get("returnType"), literal.get("responseFormat"), literal.get("failOnError", True))
        name = _typed_function(spark, spec, config)
        parameters = bound.get("modelParameters", "CAST(NULL AS STRING)")
        out.append(query[position:match.start()])
        out.append(f"{name}({bound['endpoint']}, {bound['request']}, {parameters})")
        position = end + 1
    out.append(query[position:])
    return "".join(out)


def _split_arguments(text: str, start: int) -> tuple[int | None, list[str]]:
    """Top-level arguments of a call whose '(' ends at ``start``; returns (index of ')', args)."""
    depth, quote, current, arguments = 0, None, start, []
    i = start
    while i < len(text):
        char = text[i]
        if quote:
            if char == quote:
                if i + 1 < len(text) and text[i + 1] == quote:
                    i += 1
                else:
                    quote = None
        elif char in "'\"`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                arguments.append(text[current:i].strip())
                return i, [a for a in arguments if a]
            depth -= 1
        elif char == "," and depth == 0:
            arguments.append(text[current:i].strip())
            current = i + 1
        i += 1
    return None, []


def _bind(arguments: list[str]) -> dict[str, str]:
    bound: dict[str, str] = {}
    for index, argument in enumerate(arguments):
        named = re.match(r"^([A-Za-z_]\w*)\s*(=>|:=)\s*(.*)$", argument, flags=re.DOTALL)
        if named:
            name = next((n for n in _NAMES if n.lower() == named.group(1).lower()), None)
            if name is None:
                raise InvalidParameterValue(f"ai_query has no argument {named.group(1)!r}; its arguments: {', '.join(_NAMES)}")
            bound[name] = named.group(3).strip()
        elif index < len(_NAMES):
            bound[_NAMES[index]] = argument
    return bound


_NOT_LITERAL = object()


def _literal(expression: str) -> Any:
    if re.fullmatch(r"(?i)true|false", expression):
        return expression.lower() == "true"
    if re.fullmatch(r"(?i)null", expression):
        return None
    for quote in ("'", '"'):
        if len(expression) >= 2 and expression[0] == quote and expression[-1] == quote:
            return expression[1:-1].replace(quote * 2, quote).replace("\\" + quote, quote)
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


# -- the DataFrame API -------------------------------------------------------------------------


def ai_query(endpoint: str, request: Any, returnType: str | None = None, failOnError: bool = True,  # noqa: N803
             modelParameters: dict[str, Any] | None = None, responseFormat: str | None = None,  # noqa: N803
             url: str | None = None, token: str | None = None, detailed: bool = False) -> Any:
    """A Column: ``ai_query`` over ``request`` (a Column or column name), typed by its spec.

    The whole partition goes to the serving layer in one batch per task. ``detailed=True`` is the
    extended form (as DuckDB's ``ai_query_detailed``): result, errorMessage and provenance.
    """
    from pyspark.sql import functions as F

    spec = output_spec(returnType, responseFormat, failOnError, detailed=detailed)  # a bad type fails here, on the driver
    parameters = json.dumps(modelParameters) if modelParameters else None
    if parameters is not None:
        from ai_functions.params import parse_model_parameters

        parse_model_parameters(parameters)  # refused before any task starts
    config = _dataframe_config(url, token)

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        arrays = [batch for batch in batches]
        requests = [v for array in arrays for v in _requests(array)]
        if not requests:
            return
        answers = ai_query_batch(_client(config), endpoint, requests, parameters, spec=spec, store=default_store())
        offset = 0
        for array in arrays:
            yield answers.slice(offset, len(array)) if isinstance(answers, pa.Array) else answers
            offset += len(array)

    return _iterator_udf(run, spec.spark_ddl())(F.col(request) if isinstance(request, str) else request)


def ai_embed(endpoint: str, text: Any, url: str | None = None, token: str | None = None) -> Any:
    """A Column of ARRAY<FLOAT> vectors of ``text`` (a Column or column name)."""
    from pyspark.sql import functions as F

    config = _dataframe_config(url, token)

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        arrays = list(batches)
        texts = [v for array in arrays for v in array.to_pylist()]
        if not texts:
            return
        vectors = ai_embed_batch(_client(config), endpoint, texts, store=default_store())
        offset = 0
        for array in arrays:
            yield vectors.slice(offset, len(array))
            offset += len(array)

    return _iterator_udf(run, "array<float>")(F.col(text) if isinstance(text, str) else text)


def _iterator_udf(run: Any, ddl: str) -> Any:
    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    return arrow_udf(run, ddl, ArrowUDFType.SCALAR_ITER)


def _dataframe_config(url: str | None, token: str | None) -> ClientConfig:
    if url is not None:
        return ClientConfig(url, token)
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None and id(session) in _REGISTERED:
        return _REGISTERED[id(session)]
    if session is not None:
        return ClientConfig(session.conf.get("spark.sqlinfer.url", None) or None,
                            token or session.conf.get("spark.sqlinfer.token", None) or None)
    return ClientConfig()

