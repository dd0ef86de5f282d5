"""The task functions, ``ai_filter``, ``ai_similarity`` and the AI aggregates for Spark.

Registered by :func:`connectors.spark.register` next to ai_query, with the same names and named
arguments as DuckDB (``endpoint => '...'`` on every function, ``ai_filter``'s included, since
Spark's named arguments never fill a positional slot). Each is an Arrow UDF: a whole Arrow batch
goes to ``ai_functions`` at once, exactly as in DuckDB.

Types. Most functions have one result type (STRING, BOOLEAN, FLOAT). Two depend on constant
arguments: ``ai_extract`` (a STRUCT with a field per label) and ``ai_classify`` with
``multilabel`` (ARRAY<STRING>). Registered for plain ``spark.sql`` they return that value as JSON
text; :func:`connectors.spark.sql` gives each such call a function of its exact type (DuckDB's),
evaluating the constant arguments on the driver.

Aggregates. ``ai_agg(expr, instruction)`` and ``ai_summarize_agg(expr)`` are grouped-aggregate
Arrow UDFs: ``GROUP BY`` works in SQL and in ``df.groupBy(...).agg(...)``; Spark hands over one
group at a time, so groups are reduced one after another (DuckDB reduces a chunk's groups together).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterator

from ai_functions.functions import _group_rows
from ai_functions.aggregate import SUMMARIZE_INSTRUCTION, reduce_groups
from ai_functions.task_runner import chat_endpoint, embedding_endpoint, run_task, similarity
from ai_functions.tasks import MAX_FILTER_VALUES, TaskPlan, compile_task, result_type
from ai_functions.types import STRING, SqlType
from serving.data.result_store import default_store

if TYPE_CHECKING:
    from connectors.spark import ClientConfig

# function -> (value parameters, argument parameters); every function also takes ``endpoint``.
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ai_classify": (("content",), ("labels", "options")),
    "ai_extract": (("content",), ("labels",)),
    "ai_summarize": (("content",), ("max_words",)),
    "ai_translate": (("content",), ("to_lang",)),
    "ai_analyze_sentiment": (("content",), ()),
    "ai_fix_grammar": (("content",), ()),
    "ai_mask": (("content",), ("labels",)),
    "ai_gen": (("prompt",), ()),
    "ai_filter": (("predicate",) + tuple(f"value{i}" for i in range(MAX_FILTER_VALUES)), ()),
}
TYPED_BY = {"ai_classify": ("options",), "ai_extract": ("labels",)}  # the arguments that fix the type


def _python(value: Any) -> Any:
    """An Arrow value as JSON-able Python: a MAP arrives as a list of (key, value) pairs."""
    from connectors.spark import _plain

    if isinstance(value, list) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return {k: _python(v) for k, v in value}
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_python(v) for v in value]
    return _plain(value)


def _column(array: Any, rows: int) -> list[Any]:
    if array is None:
        return [None] * rows
    return [_python(v) for v in array.to_pylist()]


def answer_task(client: Any, function: str, columns: dict[str, Any], rows: int, as_text: bool) -> list[Any]:
    """One batch of ``function``: ``columns`` maps parameter name -> Arrow array (or None)."""
    values_names, argument_names = SIGNATURES[function]
    given_values = [n for n in values_names if columns.get(n) is not None] or [values_names[0]]
    values = list(zip(*(_column(columns.get(n), rows) for n in given_values)))
    arguments = [dict(zip(argument_names, row)) for row in zip(*(_column(columns.get(n), rows) for n in argument_names))] \
        if argument_names else [{}] * rows
    endpoints = _column(columns.get("endpoint"), rows)
    argument_texts = [json.dumps({k: v for k, v in a.items() if v is not None}, sort_keys=True) for a in arguments]
    answers: list[Any] = [None] * rows
    for (endpoint, argument_text), index in _group_rows(endpoints, argument_texts).items():
        plan = compile_task(function, argument_text)
        outcomes = run_task(client, plan, chat_endpoint(endpoint), [values[i] for i in index], store=default_store())
        for i, outcome in zip(index, outcomes):
            value = None if outcome is None else outcome.value
            answers[i] = json.dumps(value) if as_text and value is not None and not isinstance(value, str) else value
    return answers


def _make_udf(function: str, result: SqlType, config: "ClientConfig", as_text: bool) -> Any:
    """An Arrow UDF of ``function`` returning ``result``, with the function's parameter names."""
    from pyspark.sql.functions import arrow_udf

    values_names, argument_names = SIGNATURES[function]
    required = [values_names[0]] + [n for n in argument_names if n in ("labels", "to_lang")]
    optional = [n for n in values_names[1:] + argument_names if n not in required] + ["endpoint"]
    signature = ", ".join(required + [f"{n}=None" for n in optional])
    source = (f"def {function}({signature}):\n"
              f"    import pyarrow as pa\n"
              f"    columns = dict(locals())\n"
              f"    rows = len(columns[{values_names[0]!r}])\n"
              f"    return pa.array(answer(client(config), {function!r}, columns, rows, as_text), arrow_type)\n")
    from connectors.spark import _client

    scope = {"answer": answer_task, "client": _client, "config": config, "as_text": as_text, "arrow_type": result.arrow()}
    exec(source, scope)  # Spark reads the parameter names (for named arguments) from the signature
    return arrow_udf(scope[function], result.ddl())


def register_tasks(spark: Any, config: "ClientConfig") -> None:
    """Register every task function, ai_similarity and the aggregates on ``spark``."""
    from pyspark.sql.functions import arrow_udf

    for function in SIGNATURES:
        typed = STRING if function in TYPED_BY else result_type(function)
        spark.udf.register(function, _make_udf(function, typed, config, as_text=function in TYPED_BY))

    @arrow_udf("float")
    def ai_similarity(a, b, endpoint=None):
        import pyarrow as pa
        from connectors.spark import _client

        rows = len(a)
        endpoints = _column(endpoint, rows)
        scores: list[Any] = [None] * rows
        left, right = a.to_pylist(), b.to_pylist()
        for (given,), index in _group_rows(endpoints).items():
            for i, score in zip(index, similarity(_client(config), embedding_endpoint(given), [left[i] for i in index],
                                                  [right[i] for i in index], store=default_store())):
                scores[i] = score
        return pa.array(scores, pa.float32())

    spark.udf.register("ai_similarity", ai_similarity)
    spark.udf.register("ai_agg", aggregate_udf(config, summarize=False))
    spark.udf.register("ai_summarize_agg", aggregate_udf(config, summarize=True))


def aggregate_udf(config: "ClientConfig", summarize: bool) -> Any:
    """A grouped-aggregate Arrow UDF: one group's values in, its reduced answer out."""
    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    def reduce(values: Any, instruction: Any = None, endpoint: Any = None) -> Any:
        from connectors.spark import _client, _scalar

        texts = values.to_pylist()
        name = "ai_summarize_agg" if summarize else "ai_agg"
        given = _scalar(instruction)
        [outcome] = reduce_groups(_client(config), chat_endpoint(_scalar(endpoint)), [texts],
                                  SUMMARIZE_INSTRUCTION if summarize else given, store=default_store(), function=name)
        return outcome.value

    if summarize:
        def ai_summarize_agg(expr, endpoint=None):
            return reduce(expr, None, endpoint)
        return arrow_udf(ai_summarize_agg, "string", ArrowUDFType.GROUPED_AGG)

    def ai_agg(expr, instruction, endpoint=None):
        return reduce(expr, instruction, endpoint)
    return arrow_udf(ai_agg, "string", ArrowUDFType.GROUPED_AGG)


def typed_function(spark: Any, function: str, arguments: dict[str, Any], config: "ClientConfig") -> str:
    """A function of ``function``'s exact result type for these constant arguments (``sql()``)."""
    import hashlib

    typed = result_type(function, arguments)
    name = f"__sqlinfer_{function}_{hashlib.sha1(typed.ddl().encode()).hexdigest()[:12]}"
    spark.udf.register(name, _make_udf(function, typed, config, as_text=False))
    return name


def dataframe_task(function: str, columns: list[Any], arguments: dict[str, Any], endpoint: str | None,
                   config: "ClientConfig") -> Any:
    """A typed Column of ``function`` over ``columns`` (DataFrame API): each task's partition in one batch."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import ArrowUDFType, arrow_udf

    plan: TaskPlan = compile_task(function, arguments)  # bad arguments fail here, on the driver
    target = chat_endpoint(endpoint)
    arrow_type = plan.result.arrow()

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from connectors.spark import _client

        for batch in batches:
            arrays = batch if isinstance(batch, tuple) else (batch,)
            rows = list(zip(*(_column(a, len(a)) for a in arrays)))
            outcomes = run_task(_client(config), plan, target, rows, store=default_store())
            yield pa.array([None if o is None else o.value for o in outcomes], arrow_type)

    cols = [F.col(c) if isinstance(c, str) else c for c in columns]
    run.__name__ = function  # the column's default name: ai_classify(review), not run(review)
    return arrow_udf(run, plan.result.ddl(), ArrowUDFType.SCALAR_ITER)(*cols)
