"""``POST /api/2.0/ai-functions/{function}``: the SQL AI functions over REST, a sqlinfer extension.

One request answers a batch of inputs with exactly the semantics of the SQL function of that
name (``ai_functions``): NULL in gives NULL out, constant arguments are checked before any call,
fixed label sets are constrained, and the whole batch goes to the model in one call. The caller
needs CAN_QUERY on the endpoint that answers (the call's ``endpoint``, else the server's
``SQLINFER_AI_FUNCTIONS_ENDPOINT``, else the bundled model), and is rate-limited as on every
query route (429 + Retry-After). Usage rows name the function.

This module sits at the REST edge, as the CLI does: it is the one place in ``serving`` that
reads ``ai_functions`` (tests/test_layers.py lists it).

Body: ``{"inputs": [...], "arguments": {...}, "endpoint": "...", "failOnError": true}``. An
input is the row's value, or a list of values for functions of several (``ai_similarity``: [a,
b]; ``ai_filter``: [template, value...]). For the aggregates (``ai_agg``, ``ai_summarize_agg``)
``inputs`` is one group's values and the answer is one value with the rounds it took.
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import Field

from ai_functions.aggregate import SUMMARIZE_INSTRUCTION, reduce_groups
from ai_functions.task_runner import chat_endpoint, embedding_endpoint, run_task, similarity
from ai_functions.tasks import MAX_FILTER_VALUES, TASK_FUNCTIONS, compile_task
from serving.api.guard import JsonRoute, principal
from serving.api.queries import as_rest_caller, may_query, query_threads
from serving.control.auth import Principal
from serving.control.wire import Strict
from serving.data.usage import ai_function
from serving.errors import InvalidParameterValue, ResourceDoesNotExist

AGGREGATES = ("ai_agg", "ai_summarize_agg")
FUNCTIONS = TASK_FUNCTIONS + ("ai_similarity",) + AGGREGATES
MAX_INPUTS = 10_000


class AIFunctionRequest(Strict):
    """The body of ``POST /api/2.0/ai-functions/{function}``."""

    inputs: list[Any] = Field(max_length=MAX_INPUTS, description="one value (or list of values) per row")
    arguments: dict[str, Any] = Field(default_factory=dict, description="labels, options, max_words, to_lang, instruction")
    endpoint: str | None = Field(default=None, min_length=1, max_length=255)
    failOnError: bool = True  # noqa: N815  (the SQL argument's name)


def _rows(function: str, inputs: list[Any]) -> list[list[Any]]:
    several = function in ("ai_similarity", "ai_filter")
    rows = []
    for index, value in enumerate(inputs):
        row = value if several and isinstance(value, list) else [value]
        if several and function == "ai_similarity" and len(row) != 2:
            raise InvalidParameterValue(f"inputs[{index}] must be a pair [a, b] for ai_similarity, got {str(value)[:80]}")
        if function == "ai_filter" and not 1 <= len(row) <= MAX_FILTER_VALUES + 1:
            raise InvalidParameterValue(f"inputs[{index}] must be [statement_or_template, value...] with at most "
                                        f"{MAX_FILTER_VALUES} values for ai_filter, got {len(row)} items")
        if any(v is not None and not isinstance(v, (str, int, float, bool)) for v in row):
            raise InvalidParameterValue(f"inputs[{index}] must hold STRING values, got {str(value)[:80]}")
        rows.append(row)
    return rows


def router() -> APIRouter:
    api = APIRouter(prefix="/api/2.0/ai-functions", tags=["ai functions"], dependencies=[Depends(principal)],
                    route_class=JsonRoute)

    def run(request: Request, who: Principal, function: str, body: AIFunctionRequest, target: str) -> dict[str, Any]:
        as_rest_caller(who, {"client_request_id": None})
        ai_function.set(function)
        client, store = request.app.state.query_client, request.app.state.result_store
        if function in AGGREGATES:
            instruction = SUMMARIZE_INSTRUCTION if function == "ai_summarize_agg" else body.arguments.get("instruction")
            [outcome] = reduce_groups(client, target, [body.inputs], instruction, store=store, function=function)
            return {"function": function, "endpoint": target, "result": outcome.value, "rounds": outcome.rounds,
                    "calls": outcome.calls}
        rows = _rows(function, body.inputs)
        if function == "ai_similarity":
            scores = similarity(client, target, [r[0] for r in rows], [r[1] for r in rows], store=store)
            return {"function": function, "endpoint": target, "results": scores}
        plan = compile_task(function, body.arguments)
        outcomes = run_task(client, plan, target, rows, store=store, fail_on_error=body.failOnError)
        if body.failOnError:
            results = [None if o is None else o.value for o in outcomes]
        else:
            results = [None if o is None else {"result": o.value, "errorMessage": o.error} for o in outcomes]
        return {"function": function, "endpoint": target, "results": results}

    @api.post("/{function}", summary="Answer a batch of inputs with one SQL AI function (CAN_QUERY on its endpoint)")
    async def answer(function: str, body: AIFunctionRequest, request: Request,
                     who: Principal = Depends(principal)) -> dict[str, Any]:
        if function not in FUNCTIONS:
            raise ResourceDoesNotExist(f"no AI function {function!r}; the functions are {', '.join(FUNCTIONS)}")
        allowed = {"ai_similarity": (), "ai_agg": ("instruction",), "ai_summarize_agg": ()}.get(function)
        if allowed is not None and set(body.arguments) - set(allowed):
            unknown = sorted(set(body.arguments) - set(allowed))[0]
            raise InvalidParameterValue(f"arguments.{unknown}: {function} takes "
                                        + (f"only {', '.join(allowed)}" if allowed else "no arguments"))
        if function == "ai_similarity":
            target = embedding_endpoint(body.endpoint)
        else:
            target = chat_endpoint(body.endpoint)
            if function not in AGGREGATES:
                compile_task(function, body.arguments)  # a bad argument is refused before the permission check costs anything
        await anyio.to_thread.run_sync(may_query, request, who, target)
        limiter = await anyio.to_thread.run_sync(query_threads, request, target)
        return await anyio.to_thread.run_sync(functools.partial(run, request, who, function, body, target), limiter=limiter)

    return api
