"""``ai_query`` and ``ai_embed`` over one Arrow batch.

The connectors call these once per chunk (DuckDB) or partition batch (Spark). A batch is grouped
by (endpoint, modelParameters) — in practice one group, since both are usually constants — then:

1. NULL requests (or NULL endpoints) give NULL and are never sent;
2. identical requests are sent once and their answer is shared by every row that asked;
3. all distinct requests of the group go to the serving client in **one** call, so the local
   engine sees the whole batch at once and can batch it continuously;
4. answers are put back in input order.

With ``fail_on_error`` (the default, as in Databricks) the first failing row, in input order,
fails the query with its endpoint, request and reason.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import pyarrow as pa

from ai_functions.errors import RowFailed
from ai_functions.params import parse_model_parameters
from ai_functions.stats import QueryStats
from engine.errors import InvalidParameterValue
from serving.client import ServingClient


def _values(array: Any, length: int) -> list[Any]:
    """Arrow (chunked) array or scalar/None -> a Python list of ``length`` values."""
    if array is None:
        return [None] * length
    if isinstance(array, (pa.Array, pa.ChunkedArray)):
        return array.to_pylist()
    return [array] * length


def _group_rows(*columns: list[Any]) -> dict[tuple[Any, ...], list[int]]:
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for row, key in enumerate(zip(*columns)):
        groups[key].append(row)
    return groups


def _dedupe(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Distinct texts in first-seen order, and for each input its index among them."""
    position: dict[str, int] = {}
    owners = [position.setdefault(text, len(position)) for text in texts]
    return list(position), owners


def _send(client: ServingClient, function: str, endpoint: str, texts: list[str], options: Any,
          stats: QueryStats | None) -> list[Any]:
    """Send distinct ``texts`` to ``endpoint`` in one call; return one result per distinct text."""
    distinct, owners = _dedupe(texts)
    weight = [0] * len(distinct)
    for owner in owners:
        weight[owner] += 1

    def on_result(index: int, result: Any) -> None:
        if stats is not None:
            stats.add(
                rows=weight[index],
                errors=weight[index] if result.error else 0,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=getattr(result, "completion_tokens", 0),
            )

    if stats is not None:
        stats.batch_started()
        stats.add(requests=len(distinct), deduplicated=len(texts) - len(distinct))
    task = client.task(endpoint)
    if function == "ai_embed":
        if task != "llm/v1/embeddings":
            raise InvalidParameterValue(
                f"ai_embed needs an embeddings endpoint, but {endpoint!r} serves {task}; use ai_query for it"
            )
        results = client.embed(endpoint, distinct, on_result)
    elif task == "llm/v1/chat":
        results = client.chat(endpoint, [[{"role": "user", "content": t}] for t in distinct], options, on_result)
    elif task == "llm/v1/completions":
        results = client.complete(endpoint, distinct, options, on_result)
    else:
        raise InvalidParameterValue(
            f"ai_query cannot send text to {endpoint!r}, an embeddings endpoint; use ai_embed({endpoint!r}, text)"
        )
    return [results[owner] for owner in owners]


def _run(function: str, client: ServingClient, endpoints: Any, requests: Any, model_parameters: Any,
         stats: QueryStats | None, fail_on_error: bool) -> list[Any]:
    """Per-row results (None for NULL rows), in input order."""
    texts = _values(requests, len(requests))
    endpoint_values = _values(endpoints, len(texts))
    parameter_values = _values(model_parameters, len(texts))
    answers: list[Any] = [None] * len(texts)
    null_rows = 0
    for (endpoint, parameters), rows in _group_rows(endpoint_values, parameter_values).items():
        live = [row for row in rows if texts[row] is not None and endpoint is not None]
        null_rows += len(rows) - len(live)
        if not live:
            continue
        options = parse_model_parameters(parameters)  # validated before any call
        results = _send(client, function, endpoint, [texts[row] for row in live], options, stats)
        for row, result in zip(live, results):
            answers[row] = result
    if stats is not None and null_rows:
        stats.add(rows=null_rows, null_rows=null_rows)
    if fail_on_error:
        for row, result in enumerate(answers):
            if result is not None and result.error:
                raise RowFailed(function, endpoint_values[row], texts[row], result.error)
    return answers


def ai_query_batch(client: ServingClient, endpoints: Any, requests: Any, model_parameters: Any = None,
                   stats: QueryStats | None = None, fail_on_error: bool = True) -> pa.Array:
    """``ai_query(endpoint, request[, modelParameters])`` for one batch -> a STRING array."""
    answers = _run("ai_query", client, endpoints, requests, model_parameters, stats, fail_on_error)
    return pa.array([None if a is None or a.error else a.text for a in answers], pa.string())


def ai_embed_batch(client: ServingClient, endpoints: Any, texts: Any, dimension: int | None = None,
                   stats: QueryStats | None = None, fail_on_error: bool = True) -> pa.Array:
    """``ai_embed(endpoint, text)`` for one batch -> FLOAT[dimension] (or FLOAT[] if not fixed)."""
    answers = _run("ai_embed", client, endpoints, texts, None, stats, fail_on_error)
    vectors = [None if a is None or a.error else a.vector for a in answers]
    if dimension is None:
        return pa.array(vectors, pa.list_(pa.float32()))
    for row, vector in enumerate(vectors):
        if vector is not None and len(vector) != dimension:
            endpoint = _values(endpoints, len(vectors))[row]
            raise InvalidParameterValue(
                f"endpoint {endpoint!r} returned {len(vector)}-dimensional vectors, but ai_embed was "
                f"registered as FLOAT[{dimension}]; register the functions again so the type follows the endpoint"
            )
    return pa.array(vectors, pa.list_(pa.float32(), dimension))
