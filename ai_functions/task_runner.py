"""Running the task functions over a batch, on ai_query's machinery, and ``ai_similarity``.

A connector hands over the rows of one chunk (a list of value lists, one per row) with the call's
plan (``ai_functions.tasks``); rows with a NULL value give NULL and are never sent, every other
row becomes one prompt for :func:`ai_functions.functions.ai_query_values`, and each answer is
finished into the function's SQL value. A finished answer that cannot be used (a label outside
the set from a provider that ignored the schema) is that row's error: with ``fail_on_error`` (the
default, as Databricks) it fails the query naming the row, otherwise the row is NULL with its
errorMessage.

Which endpoint answers (README, "Which model answers"): the call's ``endpoint`` argument, else
the connection's default, else ``SQLINFER_AI_FUNCTIONS_ENDPOINT``, else the bundled chat model;
``ai_similarity`` uses ``SQLINFER_AI_FUNCTIONS_EMBEDDING_ENDPOINT`` or the bundled embedder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

from ai_functions.errors import CastError, InvalidArgument, RowFailed
from ai_functions.functions import _run, ai_query_values
from ai_functions.stats import QueryStats
from ai_functions.tasks import TaskPlan
from serving.data.client import ServingClient
from serving.data.result_store import ResultStore

BUNDLED_CHAT = "system-smollm2-135m-instruct"
BUNDLED_EMBEDDER = "system-all-minilm-l6-v2"


def chat_endpoint(explicit: str | None = None, connection_default: str | None = None) -> str:
    """The endpoint a task function calls (see the module docstring for the order)."""
    return explicit or connection_default or os.environ.get("SQLINFER_AI_FUNCTIONS_ENDPOINT") or BUNDLED_CHAT


def embedding_endpoint(explicit: str | None = None, connection_default: str | None = None) -> str:
    """The endpoint ai_similarity embeds with."""
    return explicit or connection_default or os.environ.get("SQLINFER_AI_FUNCTIONS_EMBEDDING_ENDPOINT") or BUNDLED_EMBEDDER


@dataclass(frozen=True)
class TaskOutcome:
    """One row of a task function: its SQL value, or why it has none."""

    value: Any
    error: str | None = None


def task_prompts(plan: TaskPlan, rows: Sequence[Sequence[Any]]) -> list[str | None]:
    """Each row's prompt; None where a value is NULL (NULL in, NULL out)."""
    return [None if any(v is None for v in row) else plan.prompt(list(row)) for row in rows]


def run_task(client: ServingClient, plan: TaskPlan, endpoint: str, rows: Sequence[Sequence[Any]],
             stats: QueryStats | None = None, store: ResultStore | None = None,
             fail_on_error: bool = True) -> list[TaskOutcome | None]:
    """``plan`` over one batch: a :class:`TaskOutcome` per row, None for rows with a NULL value."""
    task = client.task(endpoint)
    if task not in ("llm/v1/chat", "llm/v1/completions"):
        raise InvalidArgument(f"{plan.function} needs a chat or completions endpoint, but {endpoint!r} serves {task}; "
                              f"pass endpoint => 'a-chat-endpoint' or set SQLINFER_AI_FUNCTIONS_ENDPOINT")
    prompts = task_prompts(plan, rows)
    outcomes: list[TaskOutcome | None] = []
    for row, answered in zip(rows, ai_query_values(client, endpoint, prompts, plan.parameters, plan.spec, stats,
                                                      store, function=plan.function)):
        if answered is None:
            outcomes.append(None)
            continue
        if answered.error is not None:
            outcome = TaskOutcome(None, answered.error)
        else:
            try:
                outcome = TaskOutcome(plan.finish(answered.value))
            except (ValueError, KeyError, TypeError) as exc:
                outcome = TaskOutcome(None, str(exc))
        if outcome.error is not None:
            if fail_on_error:
                failure = RowFailed if answered.answer.error else CastError
                shown = str(row[0]) if len(row) == 1 else json.dumps([str(v) for v in row])  # the row's value, not the instruction
                raise failure(plan.function, endpoint, shown, outcome.error)
            if stats is not None and not answered.answer.error:
                stats.add(errors=1)
        outcomes.append(outcome)
    return outcomes


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def similarity(client: ServingClient, endpoint: str, left: Sequence[Any], right: Sequence[Any],
               stats: QueryStats | None = None, store: ResultStore | None = None) -> list[float | None]:
    """``ai_similarity(a, b)`` per row: the cosine of the two texts' embeddings (1 for equal
    texts, higher is more similar; only for ranking, as Databricks says). Both columns are
    embedded in one call, each distinct text once."""
    if client.task(endpoint) != "llm/v1/embeddings":
        raise InvalidArgument(f"ai_similarity needs an embeddings endpoint, but {endpoint!r} serves "
                              f"{client.task(endpoint)}; pass endpoint => 'an-embeddings-endpoint'")
    for value in (*left, *right):
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"ai_similarity compares STRINGs, got {type(value).__name__} {str(value)[:40]!r}; "
                                  f"cast it, e.g. CAST(x AS VARCHAR)")
    live = [i for i, (a, b) in enumerate(zip(left, right)) if a is not None and b is not None]
    texts = [left[i] for i in live] + [right[i] for i in live]
    answers = _run("ai_similarity", client, endpoint, texts, None, stats, True, None, store) if texts else []
    scores: list[float | None] = [None] * len(left)
    for n, row in enumerate(live):
        a, b = answers[n].result.vector, answers[n + len(live)].result.vector
        scores[row] = float(round(cosine(a, b), 6))
    return scores
