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

import dataclasses
import json
import os
from collections import defaultdict
from typing import Any, Sequence

import pyarrow as pa

from ai_functions.errors import CastError, InvalidArgument, InvalidModelParameters, RowFailed
from ai_functions.ordering import plan_prompts, render
from ai_functions.params import parse_model_parameters
from serving.data.result_store import IN_FLIGHT, ResultStore, answer_keys, is_deterministic
from ai_functions.spec import OutputSpec, output_spec
from ai_functions.stats import QueryStats
from ai_functions.types import SqlType, coerce, parse_text
from engine.types import CUSTOM_TASK, EmbeddingResult, GenerationResult, SamplingOptions
from serving.data.batch_wire import decode_result, encode_result
from serving.data.client import ServingClient
from serving.data.usage import ai_function


def _values(array: Any, length: int) -> list[Any]:
    """Arrow (chunked) array or scalar/None -> a Python list of ``length`` values."""
    if array is None:
        return [None] * length
    if isinstance(array, (pa.Array, pa.ChunkedArray)):
        return array.to_pylist()
    if isinstance(array, list):
        return array
    return [array] * length


def _group_rows(*columns: list[Any]) -> dict[tuple[Any, ...], list[int]]:
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for row, key in enumerate(zip(*columns)):
        groups[key].append(row)
    return groups


def _sql_type_name(value: Any) -> str:
    return {bool: "BOOLEAN", int: "INTEGER", float: "DOUBLE", list: "ARRAY"}.get(type(value), type(value).__name__)


def _request_key(request: Any) -> str:
    return request if isinstance(request, str) else json.dumps(request, sort_keys=True, default=str)


def _dedupe(requests: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """Distinct requests in first-seen order, and for each input its index among them."""
    position: dict[str, int] = {}
    distinct: list[Any] = []
    owners = []
    for request in requests:
        key = _request_key(request)
        if key not in position:
            position[key] = len(distinct)
            distinct.append(request)
        owners.append(position[key])
    return distinct, owners


KIND_OF_TASK = {"llm/v1/chat": "chat", "llm/v1/completions": "complete", "llm/v1/embeddings": "embed", CUSTOM_TASK: "predict"}


def request_options(parameters: str | None, spec: OutputSpec | None, kind: str) -> SamplingOptions:
    """The sampling options a call sends: modelParameters (validated) plus structured output."""
    options = parse_model_parameters(parameters)
    if spec is not None and spec.json_schema is not None and kind in ("chat", "complete"):
        options = options.model_copy(update={"json_schema": spec.json_schema})
    if spec is not None and spec.choice is not None and kind in ("chat", "complete"):
        options = options.model_copy(update={"choice": spec.choice})
    return options


def store_keys(endpoint: str, version: str, kind: str, options: SamplingOptions, spec: OutputSpec | None,
               requests: Sequence[Any]) -> list[str]:
    """The result-store keys of ``requests`` (``options`` already carry the spec's schema)."""
    return answer_keys(endpoint, version, kind, options, requests)


@dataclasses.dataclass
class Provenance:
    """Where one row's answer came from (the extended form of ai_query shows it)."""

    cache_hit: bool = False
    attempts: int = 0  # model calls this row took: 0 from the store, 1 normally, more after repairs
    raw: str | None = None  # the model's first text, kept when it did not fit the type


@dataclasses.dataclass(frozen=True)
class Answered:
    """One request's raw answer (a Generation/Embedding/PredictionResult) and where it came from."""

    result: Any
    provenance: Provenance


@dataclasses.dataclass(frozen=True)
class RowOutcome:
    """One ai_query row: the typed value, or why it has none, with the raw answer and provenance."""

    value: Any
    error: str | None
    answer: Any
    provenance: Provenance


REPAIR_PROMPT = ("Your previous answer could not be used: {error}. Answer again with only JSON that is a valid "
                 "{ddl}, and nothing else.")


def repair_attempts() -> int:
    """``SQLINFER_REPAIR_ATTEMPTS``: how often an answer that does not fit its type is asked again (2)."""
    return int(os.environ.get("SQLINFER_REPAIR_ATTEMPTS", "2"))


def _repair(client: ServingClient, endpoint: str, kind: str, requests: list[Any], results: list[Any],
            positions: list[int], options: Any, spec: OutputSpec, provenance: list[Provenance],
            attempts: int) -> list[int]:
    """Ask again, with the validation error, for answers that do not fit ``spec``; returns the
    positions whose answers changed. After ``attempts`` tries the last answer stands (and fails)."""
    requests = [render(r, list(r)) if isinstance(r, dict) else r for r in requests]
    changed: list[int] = []
    for _ in range(attempts):
        broken = []
        for position in positions:
            result = results[position]
            if isinstance(result, GenerationResult) and not result.error:
                _, problem = _typed(result, spec.result)
                if problem is not None:
                    broken.append((position, problem))
        if not broken:
            break
        for position, _ in broken:
            if provenance[position].raw is None:
                provenance[position].raw = results[position].text
        if kind == "chat":
            conversations = [[{"role": "user", "content": requests[p]}, {"role": "assistant", "content": results[p].text or ""},
                              {"role": "user", "content": REPAIR_PROMPT.format(error=problem, ddl=spec.result.ddl())}]
                             for p, problem in broken]
            answers = client.chat(endpoint, conversations, options)
        else:
            prompts = [f"{requests[p]}\n\n{REPAIR_PROMPT.format(error=problem, ddl=spec.result.ddl())}\n" for p, problem in broken]
            answers = client.complete(endpoint, prompts, options)
        for (position, _), answer in zip(broken, answers):
            provenance[position].attempts += 1
            if not answer.error:
                previous = results[position]
                results[position] = dataclasses.replace(
                    answer, prompt_tokens=previous.prompt_tokens + answer.prompt_tokens,
                    completion_tokens=previous.completion_tokens + answer.completion_tokens)
                changed.append(position)
    return changed


def _send(client: ServingClient, function: str, endpoint: str, requests: list[Any], parameters: str | None,
          spec: OutputSpec | None, stats: QueryStats | None, store: ResultStore | None) -> list[Answered]:
    """Answer ``requests`` (one answer each, in order): stored answers first, then one call with
    the distinct rest; every answer is stored the moment it arrives."""
    task = client.task(endpoint)
    if function == "ai_embed" and task != "llm/v1/embeddings":
        raise InvalidArgument(f"ai_embed needs an embeddings endpoint, but {endpoint!r} serves {task}; use ai_query for it")
    if task in ("llm/v1/embeddings", CUSTOM_TASK) and parameters not in (None, "", "null"):
        kind = "an embeddings" if task == "llm/v1/embeddings" else "a custom model"
        raise InvalidModelParameters(f"modelParameters are not supported by {kind} endpoint such as {endpoint!r}; remove them")
    options = request_options(parameters, spec, KIND_OF_TASK[task])  # validated before any call
    wants_struct = task == CUSTOM_TASK
    for request in requests:
        if wants_struct and not isinstance(request, dict):
            raise InvalidArgument(
                f"{endpoint!r} is a custom model endpoint: its request must be a STRUCT of named input fields, "
                f"e.g. named_struct('x1', x1, 'x2', x2), not {type(request).__name__} {str(request)[:40]!r}")
        if task == "llm/v1/embeddings" and not isinstance(request, str):
            raise InvalidArgument(f"{endpoint!r} serves embeddings: its request must be a STRING")
        if not isinstance(request, (str, dict)):
            raise InvalidArgument(
                f"request must be a STRING (the user message) or a STRUCT of named fields, got "
                f"{_sql_type_name(request)} {str(request)[:40]}; cast it, e.g. CAST(x AS VARCHAR)")
    distinct, owners = _dedupe(requests)
    weight = [0] * len(distinct)
    for owner in owners:
        weight[owner] += 1
    if stats is not None:
        stats.batch_started()
        stats.add(deduplicated=len(requests) - len(distinct))
    tally = stats.tally(endpoint) if stats is not None else None
    kind = KIND_OF_TASK[task]
    version = client.config_version(endpoint)
    keyed = version is not None
    keys = store_keys(endpoint, version, kind, options, spec, distinct) if keyed else []
    deterministic = keyed and store is not None and is_deterministic(kind, options)
    results: list[Any] = [None] * len(distinct)
    provenance = [Provenance() for _ in distinct]
    checked = spec is not None and spec.result.kind != "STRING" and kind in ("chat", "complete")
    if deterministic:
        stored = store.get_many(keys)
        for i, key in enumerate(keys):
            if key in stored:
                results[i] = dataclasses.replace(decode_result(*stored[key]), from_store=True)
                provenance[i].cache_hit = True
                if tally is not None:
                    tally.add(weight[i], results[i])  # a store hit: rows, no tokens, no cost
    pending = [i for i, r in enumerate(results) if r is None]
    # A store kept per caller (statements on a server) keeps the in-flight dedupe per caller too:
    # waiting on another user's identical request would tell of it, and bill it to nobody.
    scope = getattr(store, "scope", None) or (lambda key: key)
    flight = [scope(key) for key in keys]
    if keyed:  # query-wide dedupe: what another chunk of this process is sending now, we wait for
        mine, theirs = IN_FLIGHT.claim([flight[i] for i in pending])
        to_send = [pending[j] for j in mine]
        waiting = {pending[j]: slot for j, slot in theirs.items()}
    else:
        to_send, waiting = pending, {}
    reported: set[int] = set()

    def on_result(index: int, result: Any) -> None:
        position = to_send[index]
        reported.add(position)
        if tally is not None:
            tally.add(weight[position], result)
        provenance[position].attempts = 0 if result.from_store else 1  # the server's store answered it
        provenance[position].cache_hit = result.from_store
        if deterministic and not result.error:
            store.put(keys[position], endpoint, kind, encode_result(result))  # committed before anything else
        if keyed and not checked:  # checked answers are handed over once repaired
            IN_FLIGHT.finish(flight[position], result)

    if kind in ("chat", "complete"):
        # STRUCT requests become "field: value" prompts, fields ordered for shared prefixes; the
        # batch goes in prefix order (ai_functions.ordering), answers come back by position.
        plan = plan_prompts([distinct[i] for i in to_send])
        texts = dict(zip(to_send, plan.texts))
        to_send = [to_send[j] for j in plan.order]
    try:
        if to_send:
            batch = [texts[i] for i in to_send] if kind in ("chat", "complete") else [distinct[i] for i in to_send]
            if kind == "embed":
                answers = client.embed(endpoint, batch, on_result)
            elif kind == "chat":
                answers = client.chat(endpoint, [[{"role": "user", "content": t}] for t in batch], options, on_result)
            elif kind == "complete":
                answers = client.complete(endpoint, batch, options, on_result)
            else:
                answers = client.predict(endpoint, batch, None, on_result)
            for index, (position, answer) in enumerate(zip(to_send, answers)):
                results[position] = answer
                if position not in reported:  # a backend that did not report it: store it now
                    on_result(index, answer)
        if checked:
            mine_or_stored = to_send + [i for i in range(len(distinct)) if provenance[i].cache_hit]
            repaired = _repair(client, endpoint, kind, distinct, results, mine_or_stored, options, spec, provenance,
                               repair_attempts())
            for position in dict.fromkeys(repaired):
                if stats is not None:
                    stats.add(repaired=weight[position])
                if deterministic:
                    store.put(keys[position], endpoint, kind, encode_result(results[position]))
    finally:
        if keyed:  # hand every answer over (a no-op for those handed over already); None makes a waiter send it itself
            for position in to_send:
                IN_FLIGHT.finish(flight[position], results[position])
    retry = []
    for position, slot in waiting.items():
        answer = IN_FLIGHT.wait(slot)
        if answer is None:  # the chunk that was sending it failed as a whole: send it ourselves
            retry.append(position)
        else:
            results[position] = answer
            provenance[position].attempts = 0  # answered by another chunk's request, which paid for it
            if stats is not None:
                stats.add(rows=weight[position], deduplicated=weight[position], errors=weight[position] if answer.error else 0)
    if retry:
        again = _send(client, function, endpoint, [distinct[i] for i in retry], parameters, spec, stats, None)
        for position, answered in zip(retry, again):
            results[position] = answered.result
    if tally is not None:
        tally.flush()
    return [Answered(results[owner], provenance[owner]) for owner in owners]


def _run(function: str, client: ServingClient, endpoints: Any, requests: Any, model_parameters: Any,
         stats: QueryStats | None, fail_on_error: bool, spec: OutputSpec | None = None,
         store: ResultStore | None = None) -> list[Answered | None]:
    """Per-row answers (None for NULL rows), in input order."""
    texts = _values(requests, len(requests))
    endpoint_values = _values(endpoints, len(texts))
    parameter_values = _values(model_parameters, len(texts))
    answers: list[Answered | None] = [None] * len(texts)
    null_rows = 0
    named = ai_function.set(function)  # usage rows name the SQL function that sent them
    try:
        for (endpoint, parameters), rows in _group_rows(endpoint_values, parameter_values).items():
            live = [row for row in rows if texts[row] is not None and endpoint is not None]
            null_rows += len(rows) - len(live)
            if not live:
                continue
            for row, answered in zip(live, _send(client, function, endpoint, [texts[row] for row in live], parameters,
                                                 spec, stats, store)):
                answers[row] = answered
    finally:
        ai_function.reset(named)
    if stats is not None and null_rows:
        stats.add(rows=null_rows, null_rows=null_rows)
    if fail_on_error:
        for row, answered in enumerate(answers):
            if answered is not None and answered.result.error:
                raise RowFailed(function, endpoint_values[row], _request_key(texts[row]), answered.result.error)
    return answers


def _typed(result: Any, sql_type: SqlType) -> tuple[Any, str | None]:
    """(value, errorMessage) of one answer, read as ``sql_type``."""
    if result.error:
        return None, result.error
    try:
        if isinstance(result, GenerationResult):
            return parse_text(result.text or "", sql_type), None
        if isinstance(result, EmbeddingResult):
            return coerce(result.vector, sql_type), None
        return coerce(result.value, sql_type), None
    except ValueError as exc:
        raw = getattr(result, "text", None)
        shown = f"; the answer was {raw[:200]!r}" if isinstance(raw, str) else ""
        return None, f"the answer does not fit returnType {sql_type.ddl()}: {exc}{shown}"


def ai_query_values(client: ServingClient, endpoints: Any, requests: Any, model_parameters: Any = None,
                    spec: OutputSpec | None = None, stats: QueryStats | None = None,
                    store: ResultStore | None = None, function: str = "ai_query") -> list[RowOutcome | None]:
    """``ai_query`` for one batch: a :class:`RowOutcome` per row (typed value or errorMessage, the
    raw answer and its provenance), None for NULL rows.

    ``requests`` holds strings (chat/completions) or dicts (custom models: the STRUCT's fields).
    With ``spec.fail_on_error`` the first failing row raises: :class:`RowFailed` when the model
    could not answer, :class:`CastError` when its answer does not fit the result type.
    """
    spec = spec or output_spec()
    outcomes: list[RowOutcome | None] = []
    for answered in _run(function, client, endpoints, requests, model_parameters, stats, False, spec, store):
        if answered is None:
            outcomes.append(None)
            continue
        value, problem = _typed(answered.result, spec.result)
        origin = answered.provenance
        if problem is not None and not answered.result.error and origin.raw is not None:
            problem = (f"the answer does not fit returnType {spec.result.ddl()} after {origin.attempts - 1} repair "
                       f"attempt(s); the first answer was {origin.raw[:200]!r}; last problem: {problem[:300]}")
        outcomes.append(RowOutcome(value, problem, answered.result, origin))
    if spec.fail_on_error:
        endpoint_values = _values(endpoints, len(outcomes))
        request_values = _values(requests, len(outcomes))
        for row, outcome in enumerate(outcomes):
            if outcome is not None and outcome.error is not None:
                failure = RowFailed if outcome.answer.error else CastError
                raise failure(function, endpoint_values[row], _request_key(request_values[row]), outcome.error)
    elif stats is not None:
        late = sum(1 for o in outcomes if o is not None and not o.answer.error and o.error is not None)
        if late:
            stats.add(errors=late)
    return outcomes


def ai_query_batch(client: ServingClient, endpoints: Any, requests: Any, model_parameters: Any = None,
                   stats: QueryStats | None = None, fail_on_error: bool = True, spec: OutputSpec | None = None,
                   store: ResultStore | None = None) -> Any:
    """``ai_query`` for one batch as an Arrow array of the spec's type (STRING by default)."""
    import pyarrow as pa

    spec = spec or output_spec(fail_on_error=fail_on_error)
    outcomes = ai_query_values(client, endpoints, requests, model_parameters, spec, stats, store)
    return pa.array([_row_value(o, spec) for o in outcomes], spec.arrow())


def _row_value(outcome: RowOutcome | None, spec: OutputSpec) -> Any:
    """One row as the SQL value the spec asks for: the value, {result, errorMessage}, or the
    extended form with provenance."""
    if outcome is None:
        return None
    if spec.detailed:
        answer, origin = outcome.answer, outcome.provenance
        return {"result": outcome.value, "errorMessage": outcome.error,
                "raw_text": origin.raw if origin.raw is not None else getattr(answer, "text", None),
                "attempts": origin.attempts, "served_entity": answer.served_entity, "cache_hit": origin.cache_hit,
                "input_tokens": answer.prompt_tokens, "output_tokens": getattr(answer, "completion_tokens", 0)}
    if spec.fail_on_error:
        return outcome.value
    return {"result": outcome.value, "errorMessage": outcome.error}


def ai_query_json(client: ServingClient, endpoints: Any, requests: Any, model_parameters: Any = None,
                  spec: OutputSpec | None = None, stats: QueryStats | None = None,
                  store: ResultStore | None = None) -> list[str | None]:
    """``ai_query`` for one batch as JSON text per row (DuckDB reads it back with json_transform)."""
    spec = spec or output_spec()
    outcomes = ai_query_values(client, endpoints, requests, model_parameters, spec, stats, store)
    dumps = json.dumps
    return [None if value is None else dumps(value) for value in (_row_value(o, spec) for o in outcomes)]


def ai_query_text(client: ServingClient, endpoints: Any, requests: Any, model_parameters: Any = None,
                  spec: OutputSpec | None = None, stats: QueryStats | None = None,
                  store: ResultStore | None = None) -> list[str | None]:
    """``ai_query`` for one batch as the text a STRING-typed SQL function returns (Spark's plain
    ``spark.sql``): a STRING or scalar result as its plain text (``Paris``, ``7``, ``0.25``,
    ``true``), JSON text only where a struct or array must travel as a STRING (ARRAY/STRUCT
    results, and ``failOnError => false``'s ``{"result", "errorMessage"}``)."""
    spec = spec or output_spec()
    outcomes = ai_query_values(client, endpoints, requests, model_parameters, spec, stats, store)
    plain = spec.fail_on_error and spec.result.kind not in ("ARRAY", "STRUCT")
    texts: list[str | None] = []
    for outcome in outcomes:
        value = _row_value(outcome, spec)
        if value is None:
            texts.append(None)
        elif plain:
            texts.append(("true" if value else "false") if isinstance(value, bool) else str(value))
        else:
            texts.append(json.dumps(value))
    return texts


def ai_embed_batch(client: ServingClient, endpoints: Any, texts: Any, dimension: int | None = None,
                   stats: QueryStats | None = None, fail_on_error: bool = True,
                   store: ResultStore | None = None) -> pa.Array:
    """``ai_embed(endpoint, text)`` for one batch -> FLOAT[dimension] (or FLOAT[] if not fixed)."""
    answers = _run("ai_embed", client, endpoints, texts, None, stats, fail_on_error, None, store)
    vectors = [None if a is None or a.result.error else a.result.vector for a in answers]
    if dimension is None:
        return pa.array(vectors, pa.list_(pa.float32()))
    for row, vector in enumerate(vectors):
        if vector is not None and len(vector) != dimension:
            endpoint = _values(endpoints, len(vectors))[row]
            raise InvalidArgument(
                f"endpoint {endpoint!r} returned {len(vector)}-dimensional vectors, but ai_embed was "
                f"registered as FLOAT[{dimension}]; register the functions again so the type follows the endpoint"
            )
    return pa.array(vectors, pa.list_(pa.float32(), dimension))
