"""``ai_query`` and ``ai_embed`` as DuckDB SQL functions (the task functions, ai_filter and the
AI aggregates are registered with them: ``connectors.duckdb_tasks``).

Two ways in::

    from connectors.duckdb import connect, register
    con = connect()              # a new in-memory DuckDB connection with the functions
    ai = register(existing_con)  # or add them to a connection you already have
    con.sql("SELECT ai_query('system-smollm2-135m-instruct', review) FROM 'reviews.csv'")

Each function is a vectorized Arrow UDF: DuckDB hands over a chunk of up to 2048 rows and the
whole chunk goes to the serving layer at once (``ai_functions``). A SQL macro in front of each
UDF gives the optional arguments names, so both ``modelParameters => {...}`` and
``modelParameters := {...}`` work; model parameters travel to Python as JSON (``to_json``).

``ai_embed`` returns ``FLOAT[n]``: ``n`` is read from the embedding endpoints known when the
functions are registered (384 for the bundled all-MiniLM-L6-v2; the 8-number test endpoint
``system-echo-embeddings`` does not count). If those endpoints disagree on ``n`` it returns the
variable-length ``FLOAT[]`` instead.
"""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import duckdb

from ai_functions.functions import _values, ai_embed_batch, ai_query_json
from connectors.duckdb_tasks import register_tasks
from ai_functions.explain import Budget, Estimate, Planner, estimate, totals
from serving.data.result_store import ResultStore, default_store
from ai_functions.spec import output_spec
from ai_functions.stats import QueryStats
from ai_functions.errors import InvalidArgument
from engine.errors import SqlinferError
from serving.data.client import InProcessClient, ServingClient

_QUERY_UDF = "__sqlinfer_ai_query"
_EMBED_UDF = "__sqlinfer_ai_embed"
_STRUCTURE_UDF = "__sqlinfer_ai_result_type"
_DETAILED_UDF = "__sqlinfer_ai_query_detailed"


@dataclass
class AIFunctions:
    """The functions registered on one connection: their client and what they have done."""

    client: ServingClient
    embedding_dimension: int | None
    stats: QueryStats = field(default_factory=QueryStats)
    # Finished answers, kept durably ($SQLINFER_HOME/results.db); None turns the store off.
    store: ResultStore | None = field(default_factory=default_store)
    planner: Planner | None = None  # set while `explain` runs a query: record, call no model
    budget: Budget | None = None  # enforced before every batch while set
    # The last sqlinfer error a function raised: DuckDB re-raises it as a plain InvalidInputException
    # with our message inside, and translate_error() gives the original (its code) back.
    last_error: SqlinferError | None = None
    # The connection's default endpoints for the task functions and ai_similarity (None: the
    # environment, then the bundled models; SET VARIABLE ai_functions_endpoint wins over these).
    chat_endpoint: str | None = None
    embedding_endpoint: str | None = None

    def keeping_errors(self, function: Any) -> Any:
        """``function`` with its sqlinfer errors remembered before DuckDB wraps them."""
        @functools.wraps(function)  # DuckDB reads the parameter count from the signature
        def run(*args: Any) -> Any:
            try:
                return function(*args)
            except SqlinferError as exc:
                self.last_error = exc
                raise
        return run

    def check_budget(self) -> None:
        if self.budget is not None:
            spent = self.stats.snapshot()
            cost = spent.cost if spent.cost is not None or spent.tokens_by_endpoint else 0.0  # nothing spent yet
            self.budget.check(spent.prompt_tokens + spent.completion_tokens, cost, "while running")


def _embedding_dimension(client: ServingClient) -> int | None:
    from serving.data.directory import ECHO_EMBEDDINGS_ENDPOINT

    dimensions = set()
    for name, task in client.endpoints():
        if task != "llm/v1/embeddings" or name == ECHO_EMBEDDINGS_ENDPOINT:  # the test backend does not vote
            continue
        try:
            dimension = client.embedding_dimension(name)
        except SqlinferError:  # e.g. its package is missing: it will fail clearly when called
            continue
        if dimension is not None:
            dimensions.add(dimension)
    return dimensions.pop() if len(dimensions) == 1 else None


def register(con: duckdb.DuckDBPyConnection, client: ServingClient | None = None,
             embedding_dimension: int | None | str = "auto") -> AIFunctions:
    """Add ``ai_query`` and ``ai_embed`` to ``con``; returns their handle (client, stats)."""
    client = client or InProcessClient()
    dimension = _embedding_dimension(client) if embedding_dimension == "auto" else embedding_dimension
    ai = AIFunctions(client=client, embedding_dimension=dimension)  # type: ignore[arg-type]

    def query_udf(endpoint: Any, request: Any, return_type: Any, fail_on_error: Any, model_parameters: Any,
                  response_format: Any) -> Any:
        return answer(endpoint, request, return_type, fail_on_error, model_parameters, response_format, False)

    def answer(endpoint: Any, request: Any, return_type: Any, fail_on_error: Any, model_parameters: Any,
               response_format: Any, detailed: bool) -> Any:
        import pyarrow as pa

        requests = [None if r is None else json.loads(r) for r in request.to_pylist()]
        answers: list[Any] = [None] * len(requests)
        if ai.planner is None:
            ai.check_budget()
        settings = list(zip(*(_values(c, len(requests)) for c in (return_type, response_format, fail_on_error))))
        for key in dict.fromkeys(settings):  # usually one: the arguments are constants
            rows = [i for i, s in enumerate(settings) if s == key] if len(set(settings)) > 1 else range(len(requests))
            spec = output_spec(*key, detailed=detailed)
            pick = (lambda column: column.take(pa.array(rows))) if len(rows) < len(requests) else (lambda column: column)
            if ai.planner is not None:  # explain: record what would be sent, per spec, and answer NULL
                ai.planner.record("ai_query", _values(pick(endpoint), len(rows)), [requests[i] for i in rows],
                                  _values(pick(model_parameters), len(rows)), spec)
                continue
            values = ai_query_json(ai.client, pick(endpoint), [requests[i] for i in rows], pick(model_parameters), spec,
                                   ai.stats, ai.store)
            for i, value in zip(rows, values):
                answers[i] = value
        return pa.array(answers, pa.string())

    def detailed_udf(endpoint: Any, request: Any, return_type: Any, model_parameters: Any, response_format: Any) -> Any:
        return answer(endpoint, request, return_type, None, model_parameters, response_format, True)

    def structure_udf(return_type: Any, response_format: Any, fail_on_error: Any, fail_type: Any, detailed: Any) -> Any:
        import pyarrow as pa

        for given in fail_type.to_pylist():
            if given not in ("BOOLEAN", "NULL"):  # DuckDB would cast 'yes' to true; a typo must not pass
                raise InvalidArgument(f"failOnError must be a BOOLEAN (true or false), got a {given}; "
                                      f"write failOnError => false")
        return pa.array([output_spec(t, r, f, detailed=bool(d)).duckdb_structure() for t, r, f, d in zip(
            return_type.to_pylist(), response_format.to_pylist(), fail_on_error.to_pylist(), detailed.to_pylist())], pa.string())

    def embed_udf(endpoint: Any, text: Any) -> Any:
        if ai.planner is not None:
            texts = text.to_pylist()
            ai.planner.record("ai_embed", _values(endpoint, len(texts)), texts, [None] * len(texts), None)
            return pa.array([None] * len(texts), vector_type)
        ai.check_budget()
        return ai_embed_batch(ai.client, endpoint, text, ai.embedding_dimension, ai.stats, store=ai.store)

    import pyarrow as pa

    vector_type = pa.list_(pa.float32(), dimension) if dimension else pa.list_(pa.float32())
    varchar, boolean = duckdb.sqltype("VARCHAR"), duckdb.sqltype("BOOLEAN")
    vector = duckdb.sqltype(f"FLOAT[{dimension}]" if dimension else "FLOAT[]")
    for name in (_QUERY_UDF, _DETAILED_UDF, _EMBED_UDF, _STRUCTURE_UDF):
        try:
            con.remove_function(name)
        except Exception:  # not registered yet: nothing to replace
            pass
    # null_handling="special": DuckDB must call us even when modelParameters is NULL (the
    # default); NULL requests are handled per row in ai_functions. side_effects: never fold or
    # reuse results across calls (a model is not a pure function unless asked to be).
    udf_options = {"type": "arrow", "side_effects": True, "null_handling": "special"}
    keep = ai.keeping_errors
    con.create_function(_QUERY_UDF, keep(query_udf), [varchar, varchar, varchar, boolean, varchar, varchar], varchar, **udf_options)
    con.create_function(_DETAILED_UDF, keep(detailed_udf), [varchar, varchar, varchar, varchar, varchar], varchar, **udf_options)
    con.create_function(_EMBED_UDF, keep(embed_udf), [varchar, varchar], vector, **udf_options)
    # The result type, computed from constant arguments while DuckDB binds the query: this UDF
    # is pure, so DuckDB folds it and json_transform gets a constant structure (a bad returnType
    # fails here, before any row is sent). The never-true `if(...)` around the call is what lets
    # CREATE MACRO accept the body: DuckDB checks json_transform's structure at creation only
    # when its first argument's type is already known, and a macro parameter's is not. NULL
    # requests still reach the UDF, which counts them (they are never sent to a model).
    con.create_function(_STRUCTURE_UDF, keep(structure_udf), [varchar, varchar, boolean, varchar, boolean], varchar,
                        type="arrow", side_effects=False, null_handling="special")
    con.execute(
        f"CREATE OR REPLACE TEMP MACRO ai_query(endpoint, request, returnType := NULL, failOnError := true, "
        f"modelParameters := NULL, responseFormat := NULL) AS json_transform(if(request IS NULL AND request IS NOT NULL, NULL, "
        f"{_QUERY_UDF}(endpoint, to_json(request)::VARCHAR, returnType::VARCHAR, failOnError::BOOLEAN, "
        f"to_json(modelParameters)::VARCHAR, responseFormat::VARCHAR)), "
        f"{_STRUCTURE_UDF}(returnType::VARCHAR, responseFormat::VARCHAR, failOnError::BOOLEAN, typeof(failOnError), false))"
    )
    # The extended form (sqlinfer's own): never fails a row; adds where each answer came from.
    con.execute(
        f"CREATE OR REPLACE TEMP MACRO ai_query_detailed(endpoint, request, returnType := NULL, modelParameters := NULL, "
        f"responseFormat := NULL) AS json_transform(if(request IS NULL AND request IS NOT NULL, NULL, "
        f"{_DETAILED_UDF}(endpoint, to_json(request)::VARCHAR, returnType::VARCHAR, "
        f"to_json(modelParameters)::VARCHAR, responseFormat::VARCHAR)), "
        f"{_STRUCTURE_UDF}(returnType::VARCHAR, responseFormat::VARCHAR, false, 'BOOLEAN', true))"
    )
    con.execute(f"CREATE OR REPLACE TEMP MACRO ai_embed(endpoint, text) AS {_EMBED_UDF}(endpoint, text)")
    register_tasks(con, ai)
    _HANDLES[con] = ai
    return ai


def connect(database: str = ":memory:", client: ServingClient | None = None, **kwargs: Any) -> duckdb.DuckDBPyConnection:
    """``duckdb.connect(database, **kwargs)`` with ``ai_query``/``ai_embed`` registered.

    The functions' handle (stats, client) is available as ``functions(con)``.
    """
    con = duckdb.connect(database, **kwargs)
    register(con, client)
    return con


def functions(con: duckdb.DuckDBPyConnection) -> AIFunctions:
    """The handle of the functions ``connect`` or ``register`` put on ``con``."""
    try:
        return _HANDLES[con]
    except (KeyError, TypeError):
        raise SqlinferError("this connection has no AI functions; make it with connectors.duckdb.connect() "
                            "or call register(con)") from None


# Connections accept no attributes, but weak references: the handle lives as long as the connection.
_HANDLES: "weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, AIFunctions]" = weakref.WeakKeyDictionary()


def explain(con: duckdb.DuckDBPyConnection, query: str, ai: AIFunctions | None = None) -> list[Estimate]:
    """What ``query``'s AI function calls would send and cost, without calling any model.

    The query runs once with the functions in planning mode (they record and return NULL).
    """
    ai = ai or functions(con)
    return estimate(ai.client, _plan(con, query, ai), ai.store, ai.stats.prices)


def _plan(con: duckdb.DuckDBPyConnection, query: str, ai: AIFunctions) -> Planner:
    """Run ``query`` once with the functions recording what they would send (and answering NULL)."""
    ai.planner = Planner()
    try:
        relation = con.sql(query)
        if relation is not None:
            for _ in relation.to_arrow_reader(2048):  # run it, keeping one batch at a time
                pass
        return ai.planner
    finally:
        ai.planner = None


def execute_within(con: duckdb.DuckDBPyConnection, query: str, budget: Budget, ai: AIFunctions | None = None) -> Any:
    """Run ``query`` (an Arrow table back) only if its estimate fits ``budget``, and stop it if
    spending passes the budget while it runs."""
    ai = ai or functions(con)
    tokens, cost = totals(explain(con, query, ai))
    budget.check(tokens, cost, "before running (estimate)")
    ai.stats.reset()
    ai.budget = budget
    try:
        relation = con.sql(query)
        return relation.to_arrow_table() if relation is not None else None
    finally:
        ai.budget = None


def execute_batched(con: duckdb.DuckDBPyConnection, query: str, ai: AIFunctions | None = None, poll_seconds: float = 30.0,
                    progress: Any = None, ledger: Any = None, max_requests: int | None = None,
                    budget: Budget | None = None, on_counts: Any = None) -> Any:
    """Run ``query`` (an Arrow table back) with its ai_query calls to OpenAI and Anthropic endpoints
    sent through the providers' batch APIs (``ai_functions.batch_mode``): plan, check ``budget``
    against the estimate at batch prices (``SQLINFER_BATCH_PRICES``), submit or re-attach, wait for
    the batches, then answer the query from their results (costed at batch prices too)."""
    from ai_functions.batch_mode import BatchAnsweringClient, default_ledger, prefetch
    from ai_functions.stats import prices_from_env

    ai = ai or functions(con)
    kinds = {statement.type for statement in duckdb.extract_statements(query)}
    if kinds != {duckdb.StatementType.SELECT}:  # it runs twice (plan, answer): a CREATE or INSERT would too
        raise InvalidArgument("batch mode runs one SELECT (it is planned, then answered); write the result with "
                              "--format jsonl or into a table with a second statement")
    batch_prices = prices_from_env("SQLINFER_BATCH_PRICES")
    planner = _plan(con, query, ai)
    if budget is not None:
        tokens, cost = totals(estimate(ai.client, planner, ai.store, batch_prices))
        budget.check(tokens, cost, "before submitting any batch (estimate at batch prices)")
    ledger = ledger or default_ledger()
    report = prefetch(ai.client, planner, ledger, poll_seconds, progress, max_requests, on_counts)
    endpoints = {call.endpoint for call in planner.calls.values() if call.function == "ai_query"}
    ai.stats.reset()  # this run's stats: the batched endpoints costed at their batch prices (None: no price)
    ai.stats.batch_prices = {endpoint: batch_prices.get(endpoint) for endpoint in endpoints}
    online = ai.client
    ai.client = answering = BatchAnsweringClient(online, ledger, endpoints)
    try:
        relation = con.sql(query)
        table = relation.to_arrow_table() if relation is not None else None
    finally:
        ai.client = online
    report.sent_online = answering.sent_online
    ai.batch_report = report
    return table


class SqlError(SqlinferError):
    """DuckDB refused the query itself (syntax, an unknown table or column, a failed cast)."""

    error_code = "SQL_ERROR"
    http_status = 400


_UDF_PREFIX = "Python exception occurred while executing the UDF: "


def translate_error(con: duckdb.DuckDBPyConnection, exc: duckdb.Error) -> SqlinferError:
    """The error a failed query should be reported as: the sqlinfer error an AI function raised
    (its own code), the query's own mistake (SQL_ERROR), or, for any other Python exception inside
    a function, INTERNAL_ERROR (a bug in sqlinfer)."""
    text = str(exc)
    ours = _HANDLES.get(con)
    if ours is not None and ours.last_error is not None and ours.last_error.message in text:
        return ours.last_error
    if _UDF_PREFIX in text:
        return SqlinferError(text.split(_UDF_PREFIX, 1)[1])
    return SqlError(text)
