"""``ai_agg(expr, instruction)`` and ``ai_summarize_agg(expr)``: aggregates larger than a context window.

A group's values rarely fit one prompt, so a group is reduced in rounds (as Snowflake's AI_AGG):

1. the values are packed, in order, into chunks that fit the model's context next to the
   instruction and the answer (a value longer than a whole chunk is cut into pieces);
2. each chunk is answered with the instruction (round 1);
3. while a group has more than one partial answer, its partial answers are packed again and
   combined ("combine these partial answers into one answer to: <instruction>");

until one answer is left. Every round sends the chunks of *all* groups of the batch in one
ai_query call, so the local engine batches across groups. NULL values are skipped; a group with
no values gives NULL. The number of rounds is in the query's summary (``QueryStats``).

Sizes: the context is ``SQLINFER_AI_AGG_CONTEXT_TOKENS`` (2048, the engine's ``max_model_len``),
each answer at most ``SQLINFER_AI_AGG_MAX_TOKENS`` (256) tokens; values are measured with the
model's own tokenizer where the model is local, ~4 characters per token otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from ai_functions.errors import InvalidArgument, RowFailed
from ai_functions.functions import ai_query_values
from ai_functions.spec import OutputSpec
from ai_functions.stats import QueryStats
from ai_functions.types import STRING
from serving.data.client import ServingClient
from serving.data.result_store import ResultStore

SUMMARIZE_INSTRUCTION = "Summarize these items in one paragraph."
TEMPLATE_MARGIN = 64  # tokens a chat template and the item markers add around the text
CHARS_PER_TOKEN = 4
MAX_ROUNDS = 20


@dataclass(frozen=True)
class AggregateOutcome:
    """One group's answer and how many rounds it took (0 for a group of NULLs only)."""

    value: str | None
    rounds: int
    calls: int


@dataclass
class _Group:
    pieces: list[str]
    rounds: int = 0
    calls: int = 0
    answer: str | None = None
    previous: int = 0  # partial answers after the last round


def _sizes() -> tuple[int, int]:
    context = int(os.environ.get("SQLINFER_AI_AGG_CONTEXT_TOKENS", "2048"))
    answer = int(os.environ.get("SQLINFER_AI_AGG_MAX_TOKENS", "256"))
    return context, answer


def first_prompt(instruction: str) -> tuple[str, str]:
    """(what goes before the items, what goes after them): the task follows the items, which a
    small model follows far better than a task it read before a long list."""
    return "Items:\n", f"\nTask: {instruction}\nAnswer the task for the items above."


def combine_prompt(instruction: str) -> tuple[str, str]:
    return ("Each part below answers the task for one share of a list too long to read at once.\n\nParts:\n",
            f"\nTask: {instruction}\nCombine the parts into one answer to the task.")


class _Measure:
    """Token counts of texts for one endpoint: its tokenizer if local, else ~4 characters a token."""

    def __init__(self, client: ServingClient, endpoint: str):
        self.client, self.endpoint = client, endpoint

    def __call__(self, texts: Sequence[str]) -> list[int]:
        counted = self.client.count_tokens(self.endpoint, list(texts), "complete") if texts else []
        return counted if counted is not None else [max(1, len(t) // CHARS_PER_TOKEN) for t in texts]


def _pack(pieces: list[str], sizes: list[int], budget: int) -> list[list[str]]:
    """Consecutive pieces in chunks of at most ``budget`` tokens (each piece already fits)."""
    chunks: list[list[str]] = []
    used = budget + 1
    for piece, size in zip(pieces, sizes):
        if used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(piece)
        used += size + 2  # the "- " marker and newline
    return chunks


def _cut(piece: str, size: int, budget: int) -> list[str]:
    """A piece longer than a chunk, cut into parts that fit (by characters, proportionally)."""
    parts = -(-size // budget) + 1
    width = -(-len(piece) // parts)
    return [piece[i:i + width] for i in range(0, len(piece), width)]


def _item_texts(values: Sequence[Any] | None) -> list[str]:
    """A group's non-NULL values as text (JSON for anything that is not a string)."""
    return [v if isinstance(v, str) else json.dumps(v, default=str) for v in (values or ()) if v is not None]


def _budget(measure: _Measure, instruction: str, function: str) -> tuple[int, int]:
    """(tokens a chunk of items may take, tokens an answer may take); refused when two answers
    would not fit one combining prompt, since combining would then never end."""
    context, answer_tokens = _sizes()
    overhead = max(measure(["".join(combine_prompt(instruction))])[0], 0) + TEMPLATE_MARGIN
    budget = context - answer_tokens - overhead
    if budget < 2 * (answer_tokens + 2):
        raise InvalidArgument(f"{function}: the instruction ({overhead - TEMPLATE_MARGIN} tokens) leaves {budget} of the "
                              f"{context}-token context for items; two answers of {answer_tokens} tokens must fit; "
                              f"shorten the instruction or lower SQLINFER_AI_AGG_MAX_TOKENS")
    return budget, answer_tokens


def reduce_groups(client: ServingClient, endpoint: str, groups: Sequence[Sequence[Any] | None], instruction: str,
                  stats: QueryStats | None = None, store: ResultStore | None = None,
                  function: str = "ai_agg") -> list[AggregateOutcome]:
    """Each group's single answer to ``instruction`` over its values (see the module docstring)."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise InvalidArgument(f"{function}: the instruction must be a non-empty STRING, got {instruction!r}; "
                              f"e.g. ai_agg(review, 'List the complaints')")
    task = client.task(endpoint)
    if task not in ("llm/v1/chat", "llm/v1/completions"):
        raise InvalidArgument(f"{function} needs a chat or completions endpoint, but {endpoint!r} serves {task}")
    measure = _Measure(client, endpoint)
    budget, answer_tokens = _budget(measure, instruction, function)
    state = [_Group(texts) if (texts := _item_texts(values)) else None for values in groups]
    parameters = json.dumps({"max_tokens": answer_tokens})
    spec = OutputSpec(STRING, None, False)
    while True:
        pending = [g for g in state if g is not None and g.answer is None]
        # One tokenizer call per round for every group (over a server, each call is a request).
        sizes = iter(measure([piece for group in pending for piece in group.pieces]))
        jobs: list[tuple[_Group, str]] = []
        for group in pending:
            pieces: list[str] = []
            piece_sizes: list[int] = []
            for piece in group.pieces:
                size = next(sizes)
                parts = [piece] if size <= budget else _cut(piece, size, budget)
                pieces.extend(parts)
                piece_sizes.extend([size] if len(parts) == 1 else measure(parts))
            before, after = first_prompt(instruction) if group.rounds == 0 else combine_prompt(instruction)
            for chunk in _pack(pieces, piece_sizes, budget):
                jobs.append((group, before + "".join(f"- {p}\n" for p in chunk) + after))
            group.pieces = []
            group.rounds += 1
        if not jobs:
            break
        if max(g.rounds for g, _ in jobs) > MAX_ROUNDS:  # cannot happen while two answers fit a chunk
            raise InvalidArgument(f"{function}: a group still has {len(jobs)} parts after {MAX_ROUNDS} rounds; "
                                  f"lower SQLINFER_AI_AGG_MAX_TOKENS")
        outcomes = ai_query_values(client, endpoint, [prompt for _, prompt in jobs], parameters, spec, stats, store,
                                   function=function)
        for (group, prompt), outcome in zip(jobs, outcomes):
            group.calls += 1
            if outcome.error is not None:
                raise RowFailed(function, endpoint, prompt, outcome.error)
            group.pieces.append(outcome.value.strip())
        for group in pending:
            if len(group.pieces) == 1:
                group.answer = group.pieces[0]
            elif group.rounds > 1 and len(group.pieces) >= group.previous:  # combining did not shrink it
                raise InvalidArgument(f"{function}: combining {group.previous} partial answers gave {len(group.pieces)}; "
                                      f"they do not fit two to a prompt; lower SQLINFER_AI_AGG_MAX_TOKENS")
            group.previous = len(group.pieces)
    results = [AggregateOutcome(None, 0, 0) if g is None else AggregateOutcome(g.answer, g.rounds, g.calls) for g in state]
    if stats is not None:
        reduced = [r for r in results if r.rounds]
        stats.aggregated(len(reduced), max((r.rounds for r in reduced), default=0))
    return results


def planned_prompts(client: ServingClient, endpoint: str, groups: Sequence[Sequence[Any] | None],
                    instruction: str, function: str = "ai_agg") -> list[str]:
    """For EXPLAIN: the prompts a reduction would send, later rounds at their largest (every
    partial answer assumed ``max_tokens`` long), so the count is an upper bound. Later rounds'
    prompts are stand-ins of that size, distinct per group so that dedupe does not merge them."""
    measure = _Measure(client, endpoint)
    budget, answer_tokens = _budget(measure, instruction, function)
    before, after = first_prompt(instruction)
    filler = "x" * (answer_tokens * CHARS_PER_TOKEN)
    per_chunk = budget // (answer_tokens + 2)
    prompts: list[str] = []
    for group, values in enumerate(groups):
        texts = _item_texts(values)
        if not texts:
            continue
        chunks = _pack(texts, [min(s, budget) for s in measure(texts)], budget)
        prompts += [before + "".join(f"- {p}\n" for p in chunk) + after for chunk in chunks]
        partials, round_number = len(chunks), 1
        while partials > 1:
            round_number += 1
            partials = -(-partials // per_chunk)
            prompts += ["".join(combine_prompt(instruction)) + f"[group {group}, round {round_number}, part {i}] {filler}"
                        for i in range(partials)]
    return prompts
