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
registered with :func:`register` returns STRING: plain text for a STRING or scalar result
(``Paris``, ``7``, ``true``), JSON text only for a STRUCT or ARRAY result and for
``failOnError => false``'s ``{"result", "errorMessage"}`` (see the README's table). For typed
results run the query through :func:`sql`, which gives each ``ai_query`` call with literal
arguments a function of its own, typed exactly as in DuckDB (``STRUCT<result, errorMessage>``
included); the DataFrame API is typed always. All execution is Arrow-based (``arrow_udf``): the
SQL functions receive each Arrow batch whole, the DataFrame API a task's whole partition. The typed
rewrite lives in ``connectors.spark_rewrite``; the task functions in ``connectors.spark_tasks``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterator

from ai_functions.functions import ai_embed_batch, ai_query_batch, ai_query_text
from serving.data.result_store import default_store
from ai_functions.spec import output_spec


@dataclass(frozen=True)
class ClientConfig:
    """What an executor needs to reach the serving layer (picklable; no live objects).

    ``sidecar``: each host's workers share one ``sqlinfer serve`` on that host, started on first
    use (``connectors.sidecar``), instead of a central ``url``.
    """

    url: str | None = None
    token: str | None = None
    sidecar: bool = False


_CLIENTS: dict[ClientConfig, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(config: ClientConfig) -> Any:
    """This Python worker's client for ``config``, built once and reused by later tasks."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(config)
        if client is None:
            if config.sidecar:
                from connectors import sidecar
                from serving.data.http_client import HttpServingClient

                running = sidecar.ensure()
                client = HttpServingClient(running.url, running.token)
            elif config.url:
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


def register(spark: Any, url: str | None = None, token: str | None = None, sidecar: bool | None = None) -> ClientConfig:
    """Add ``ai_query`` and ``ai_embed`` to ``spark``'s SQL, with named arguments.

    ``url``/``token`` default to the session settings ``spark.sqlinfer.url`` and
    ``spark.sqlinfer.token``; ``sidecar=True`` (or ``spark.sqlinfer.sidecar=true``) serves each
    host's rows from a ``sqlinfer serve`` on that host instead.
    """
    from pyspark.sql.functions import arrow_udf

    if sidecar is None:
        sidecar = (spark.conf.get("spark.sqlinfer.sidecar", None) or "").lower() == "true"
    config = ClientConfig(None if sidecar else url or spark.conf.get("spark.sqlinfer.url", None) or None,
                          None if sidecar else token or spark.conf.get("spark.sqlinfer.token", None) or None, sidecar)

    @arrow_udf("string")
    def ai_query(endpoint, request, returnType=None, failOnError=None, modelParameters=None, responseFormat=None):  # noqa: N803
        import pyarrow as pa

        spec = output_spec(_scalar(returnType), _scalar(responseFormat), _scalar(failOnError))
        answers = ai_query_text(_client(config), endpoint, _requests(request), _json_texts(modelParameters), spec, store=default_store())
        return pa.array(answers, pa.string())

    @arrow_udf("array<float>")
    def ai_embed(endpoint, text):
        return ai_embed_batch(_client(config), endpoint, text, store=default_store())

    spark.udf.register("ai_query", ai_query)
    spark.udf.register("ai_embed", ai_embed)
    from connectors.spark_tasks import register_tasks

    register_tasks(spark, config)
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
    from connectors.spark_rewrite import rewrite

    config = _REGISTERED.get(id(spark)) or register(spark)
    return spark.sql(rewrite(spark, query, config))


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



# -- the task functions in the DataFrame API ---------------------------------------------------


def ai_task(function: str, *columns: Any, endpoint: str | None = None, url: str | None = None,
            token: str | None = None, **arguments: Any) -> Any:
    """A typed Column of a task function (``ai_classify``, ``ai_extract``, ...) over ``columns``
    (Columns or column names); ``arguments`` are its constants (labels, options, max_words, to_lang)."""
    from connectors.spark_tasks import dataframe_task

    given = {k: v for k, v in arguments.items() if v is not None}
    return dataframe_task(function, list(columns), given, endpoint, _dataframe_config(url, token))


def ai_classify(content: Any, labels: Any, options: dict[str, Any] | None = None, **where: Any) -> Any:
    return ai_task("ai_classify", content, labels=labels, options=options, **where)


def ai_extract(content: Any, labels: Any, **where: Any) -> Any:
    return ai_task("ai_extract", content, labels=labels, **where)


def ai_summarize(content: Any, max_words: int | None = None, **where: Any) -> Any:
    return ai_task("ai_summarize", content, max_words=max_words, **where)


def ai_translate(content: Any, to_lang: str, **where: Any) -> Any:
    return ai_task("ai_translate", content, to_lang=to_lang, **where)


def ai_analyze_sentiment(content: Any, **where: Any) -> Any:
    return ai_task("ai_analyze_sentiment", content, **where)


def ai_fix_grammar(content: Any, **where: Any) -> Any:
    return ai_task("ai_fix_grammar", content, **where)


def ai_mask(content: Any, labels: list[str], **where: Any) -> Any:
    return ai_task("ai_mask", content, labels=labels, **where)


def ai_gen(prompt: Any, **where: Any) -> Any:
    return ai_task("ai_gen", prompt, **where)


def ai_filter(predicate: Any, *values: Any, **where: Any) -> Any:
    """A BOOLEAN Column: ``predicate`` a template ('{0} is about {1}') filled from ``values``, or
    an instruction followed by them. Pass string constants as ``F.lit(...)``."""
    return ai_task("ai_filter", predicate, *values, **where)


def ai_similarity(a: Any, b: Any, endpoint: str | None = None, url: str | None = None, token: str | None = None) -> Any:
    """A FLOAT Column: the cosine of the embeddings of ``a`` and ``b``."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    from ai_functions.task_runner import embedding_endpoint, similarity

    config, target = _dataframe_config(url, token), embedding_endpoint(endpoint)

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        for left, right in batches:
            yield pa.array(similarity(_client(config), target, left.to_pylist(), right.to_pylist(), store=default_store()),
                           pa.float32())

    columns = [F.col(c) if isinstance(c, str) else c for c in (a, b)]
    return arrow_udf(run, "float", ArrowUDFType.SCALAR_ITER)(*columns)


def ai_agg(expr: Any, instruction: str, endpoint: str | None = None, url: str | None = None, token: str | None = None) -> Any:
    """An aggregate Column for ``df.groupBy(...).agg(ai_agg('review', 'List the complaints'))``."""
    from pyspark.sql import functions as F

    from connectors.spark_tasks import aggregate_udf

    column = F.col(expr) if isinstance(expr, str) else expr
    extra = [F.lit(endpoint)] if endpoint else []
    return aggregate_udf(_dataframe_config(url, token), summarize=False)(column, F.lit(instruction), *extra)


def ai_summarize_agg(expr: Any, endpoint: str | None = None, url: str | None = None, token: str | None = None) -> Any:
    from pyspark.sql import functions as F

    from connectors.spark_tasks import aggregate_udf

    column = F.col(expr) if isinstance(expr, str) else expr
    extra = [F.lit(endpoint)] if endpoint else []
    return aggregate_udf(_dataframe_config(url, token), summarize=True)(column, *extra)
