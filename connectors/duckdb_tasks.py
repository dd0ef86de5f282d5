"""The task functions, ``ai_similarity``, ``ai_filter`` and the AI aggregates as DuckDB SQL.

Registered by :func:`connectors.duckdb.register` next to ai_query. Each function is a SQL macro
over three Arrow UDFs, so a chunk of up to 2048 rows (or join pairs) goes to the serving layer at
once:

* ``__sqlinfer_ai_task(function, endpoint, values, arguments)``: any task function; the row's
  values and the call's arguments travel as JSON, the answer comes back as JSON and is typed by
  ``json_transform`` with a structure fixed while DuckDB binds (``__sqlinfer_ai_task_type``, pure,
  so a bad argument fails before any row is sent);
* ``__sqlinfer_ai_similarity(endpoint, a, b)`` -> FLOAT;
* ``__sqlinfer_ai_agg(endpoint, values, instruction)``: the macro wraps ``list(expr)``, so
  ``ai_agg`` is an aggregate for DuckDB (``GROUP BY`` works) and all groups of a chunk are
  reduced together.

The endpoint: ``endpoint => '...'`` per call, else ``SET VARIABLE ai_functions_endpoint = '...'``
(``ai_functions_embedding_endpoint`` for ai_similarity) per connection, else the handle's
``chat_endpoint``/``embedding_endpoint``, else the environment and the bundled models
(``ai_functions.task_runner``). ``ai_filter`` takes its values positionally (up to five), so its
endpoint comes from the connection: DuckDB cannot tell a named default from a sixth value.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import duckdb

from ai_functions.aggregate import SUMMARIZE_INSTRUCTION, planned_prompts, reduce_groups
from ai_functions.functions import _group_rows, _values
from ai_functions.task_runner import chat_endpoint, embedding_endpoint, run_task, similarity, task_prompts
from ai_functions.tasks import MAX_FILTER_VALUES, compile_task, result_type

if TYPE_CHECKING:
    from connectors.duckdb import AIFunctions

_TASK_UDF = "__sqlinfer_ai_task"
_TASK_TYPE_UDF = "__sqlinfer_ai_task_type"
_SIMILARITY_UDF = "__sqlinfer_ai_similarity"
_AGG_UDF = "__sqlinfer_ai_agg"
# Read in the macro body: a macro's default is evaluated once, when the macro is created.
CHAT_ENDPOINT = "coalesce(endpoint, getvariable('ai_functions_endpoint'))"
EMBED_ENDPOINT = "coalesce(endpoint, getvariable('ai_functions_embedding_endpoint'))"

# function -> (its value parameters, its other parameters as "name := default", the arguments
# that fix its result type). Names follow Databricks' reference.
_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "ai_classify": (("content",), ("labels", "options := NULL"), ("options",)),
    "ai_extract": (("content",), ("labels",), ("labels",)),
    "ai_summarize": (("content",), ("max_words := NULL",), ()),
    "ai_translate": (("content",), ("to_lang",), ()),
    "ai_analyze_sentiment": (("content",), (), ()),
    "ai_fix_grammar": (("content",), (), ()),
    "ai_mask": (("content",), ("labels",), ()),
    "ai_gen": (("prompt",), (), ()),
}


def register_tasks(con: duckdb.DuckDBPyConnection, ai: "AIFunctions") -> None:
    import pyarrow as pa

    def task_udf(function: Any, endpoint: Any, values: Any, arguments: Any) -> Any:
        rows = len(values)
        functions, endpoints, argument_texts = (_values(c, rows) for c in (function, endpoint, arguments))
        decoded = [None if v is None else json.loads(v) for v in values.to_pylist()]
        answers: list[Any] = [None] * rows
        if ai.planner is None:
            ai.check_budget()
        # one group in practice: the arguments are constants
        for (name, given_endpoint, argument_text), rows_of_key in _group_rows(functions, endpoints, argument_texts).items():
            plan = compile_task(name, argument_text)
            target = chat_endpoint(given_endpoint, ai.chat_endpoint)
            batch = [decoded[i] or [None] for i in rows_of_key]
            if ai.planner is not None:
                prompts = task_prompts(plan, batch)
                ai.planner.record(name, [target] * len(prompts), prompts, [plan.parameters] * len(prompts), plan.spec)
                continue
            outcomes = run_task(ai.client, plan, target, batch, ai.stats, ai.store)
            for i, outcome in zip(rows_of_key, outcomes):
                answers[i] = None if outcome is None or outcome.value is None else json.dumps(outcome.value)
        return pa.array(answers, pa.string())

    def task_type_udf(function: Any, arguments: Any) -> Any:
        return pa.array([json.dumps(result_type(f, a).duckdb_structure())
                         for f, a in zip(function.to_pylist(), arguments.to_pylist())], pa.string())

    def similarity_udf(endpoint: Any, left: Any, right: Any) -> Any:
        rows = len(left)
        lefts, rights = left.to_pylist(), right.to_pylist()
        scores: list[Any] = [None] * rows
        endpoints = _values(endpoint, rows)
        for (given,), index in _group_rows(endpoints).items():
            target = embedding_endpoint(given, ai.embedding_endpoint)
            if ai.planner is not None:
                texts = [t for i in index for t in (lefts[i], rights[i]) if lefts[i] is not None and rights[i] is not None]
                ai.planner.record("ai_similarity", [target] * len(texts), texts, [None] * len(texts), None)
                continue
            ai.check_budget()
            for i, score in zip(index, similarity(ai.client, target, [lefts[i] for i in index], [rights[i] for i in index],
                                                  ai.stats, ai.store)):
                scores[i] = score
        return pa.array(scores, pa.float32())

    def agg_udf(endpoint: Any, values: Any, instruction: Any, function: Any) -> Any:
        rows = len(values)
        groups = [None if v is None else json.loads(v) for v in values.to_pylist()]
        endpoints, instructions, functions = (_values(c, rows) for c in (endpoint, instruction, function))
        answers: list[Any] = [None] * rows
        for (given, text, name), index in _group_rows(endpoints, instructions, functions).items():
            target = chat_endpoint(given, ai.chat_endpoint)
            text = SUMMARIZE_INSTRUCTION if name == "ai_summarize_agg" else text
            if ai.planner is not None:
                prompts = planned_prompts(ai.client, target, [groups[i] for i in index], text, name)
                ai.planner.record(name, [target] * len(prompts), prompts, [None] * len(prompts), None)
                continue
            ai.check_budget()
            for i, outcome in zip(index, reduce_groups(ai.client, target, [groups[i] for i in index], text, ai.stats,
                                                       ai.store, function=name)):
                answers[i] = outcome.value
        return pa.array(answers, pa.string())

    varchar, real = duckdb.sqltype("VARCHAR"), duckdb.sqltype("FLOAT")
    for name in (_TASK_UDF, _TASK_TYPE_UDF, _SIMILARITY_UDF, _AGG_UDF):
        try:
            con.remove_function(name)
        except Exception:  # not registered yet: nothing to replace
            pass
    keep = ai.keeping_errors
    options = {"type": "arrow", "side_effects": True, "null_handling": "special"}
    con.create_function(_TASK_UDF, keep(task_udf), [varchar] * 4, varchar, **options)
    con.create_function(_TASK_TYPE_UDF, keep(task_type_udf), [varchar, varchar], varchar, type="arrow",
                        side_effects=False, null_handling="special")
    con.create_function(_SIMILARITY_UDF, keep(similarity_udf), [varchar] * 3, real, **options)
    con.create_function(_AGG_UDF, keep(agg_udf), [varchar] * 4, varchar, **options)
    for function, (values, others, typing) in _SIGNATURES.items():
        names = [o.split(" :=")[0] for o in others]
        arguments = "to_json({" + ", ".join(f"'{n}': {n}" for n in names) + "})::VARCHAR" if names else "'{}'"
        type_arguments = "to_json({" + ", ".join(f"'{n}': {n}" for n in typing) + "})::VARCHAR" if typing else "'{}'"
        parameters = ", ".join(values + others + ("endpoint := NULL",))
        con.execute(_typed_macro(function, parameters, values, arguments, type_arguments))
    # ai_filter(statement_or_template, value...): overloads for zero to five values.
    overloads = []
    for count in range(MAX_FILTER_VALUES + 1):
        values = ("predicate",) + tuple(f"value{i}" for i in range(count))
        overloads.append(f"({', '.join(values)}) AS " + _typed_body("ai_filter", values, "'{}'", "'{}'",
                                                                  "getvariable('ai_functions_endpoint')"))
    con.execute("CREATE OR REPLACE TEMP MACRO ai_filter" + ", ".join(overloads))
    con.execute(f"CREATE OR REPLACE TEMP MACRO ai_similarity(a, b, endpoint := NULL) AS "
                f"{_SIMILARITY_UDF}({EMBED_ENDPOINT}, a::VARCHAR, b::VARCHAR)")
    con.execute(f"CREATE OR REPLACE TEMP MACRO ai_agg(expr, instruction, endpoint := NULL) AS "
                f"{_AGG_UDF}({CHAT_ENDPOINT}, to_json(list(expr))::VARCHAR, instruction, 'ai_agg')")
    con.execute(f"CREATE OR REPLACE TEMP MACRO ai_summarize_agg(expr, endpoint := NULL) AS "
                f"{_AGG_UDF}({CHAT_ENDPOINT}, to_json(list(expr))::VARCHAR, NULL, 'ai_summarize_agg')")


def _typed_macro(function: str, parameters: str, values: tuple[str, ...], arguments: str, type_arguments: str) -> str:
    return (f"CREATE OR REPLACE TEMP MACRO {function}({parameters}) AS "
            + _typed_body(function, values, arguments, type_arguments, CHAT_ENDPOINT))


def _typed_body(function: str, values: tuple[str, ...], arguments: str, type_arguments: str, endpoint: str) -> str:
    # As ai_query's macro: the never-true if(...) lets CREATE MACRO accept a json_transform whose
    # structure comes from a (pure, folded at bind time) UDF.
    first = values[0]
    row = "to_json([" + ", ".join(f"{v}::VARCHAR" for v in values) + "])::VARCHAR"
    return (f"json_transform(if({first} IS NULL AND {first} IS NOT NULL, NULL, "
            f"{_TASK_UDF}('{function}', {endpoint}, {row}, {arguments})), "
            f"{_TASK_TYPE_UDF}('{function}', {type_arguments}))")
