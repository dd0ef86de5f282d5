"""Prefix-aware ordering of a batch for the local engine (vLLM prefix caching).

vLLM reuses the KV cache of a prompt prefix it has already computed, so a batch is cheaper when
requests that share long prefixes run together and the shared parts come first. Following Liu et
al., "Optimizing LLM Queries in Relational Workloads" (greedy group recursion, GGR):

* STRUCT requests to chat/completion endpoints become prompts of ``field: value`` lines. Each
  row's field order is chosen by GGR: take the (field, value) that saves the most prefill —
  its length times the number of *other* rows that share it — put it first for those rows, and
  recurse into that group with the remaining fields and into the other rows with all fields.
  Fields with few distinct values (a shared instruction, a category) so come first.
* The batch's prompts are then sorted, so prompts with a common prefix are adjacent and run
  while their cached blocks are still there. Answers are put back in input order by the caller.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def ggr_field_orders(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """For each row, its field names in the order that maximises prefixes shared with other rows."""
    orders: list[list[str]] = [[] for _ in rows]
    if not rows:
        return orders
    fields = list(rows[0])

    def recurse(members: list[int], remaining: list[str]) -> None:
        while members and remaining:
            if len(members) == 1:
                orders[members[0]].extend(remaining)
                return
            best, best_score = None, 0
            for field in remaining:
                counts = Counter(_text(rows[i].get(field)) for i in members)
                value, count = counts.most_common(1)[0]
                score = (count - 1) * (len(field) + len(value) + 2)
                if score > best_score:
                    best, best_score = (field, value), score
            if best is None:  # nothing is shared any more: keep the remaining fields as given
                for i in members:
                    orders[i].extend(remaining)
                return
            field, value = best
            group = [i for i in members if _text(rows[i].get(field)) == value]
            rest = [i for i in members if _text(rows[i].get(field)) != value]
            for i in group:
                orders[i].append(field)
            recurse(group, [f for f in remaining if f != field])
            members = rest  # the others start again with every field still to place

    recurse(list(range(len(rows))), fields)
    return orders


def render(row: dict[str, Any], order: Sequence[str]) -> str:
    """One STRUCT request as the prompt text the model sees."""
    return "\n".join(f"{field}: {_text(row.get(field))}" for field in order)


def prompts_for(rows: Sequence[dict[str, Any]]) -> list[str]:
    """STRUCT requests to an LLM endpoint as prompts, fields ordered for prefix sharing."""
    return [render(row, order) for row, order in zip(rows, ggr_field_orders(rows))]


def prefix_order(prompts: Sequence[str]) -> list[int]:
    """Positions of ``prompts`` in the order to send them: sorted, so shared prefixes are adjacent."""
    return sorted(range(len(prompts)), key=lambda i: prompts[i])


@dataclass(frozen=True)
class PromptPlan:
    """A batch of chat/completion requests as the model will see it."""

    texts: list[str]  # each request's prompt text, in input order
    order: list[int]  # input positions in the order they are sent

    def sent(self) -> list[str]:
        return [self.texts[i] for i in self.order]


def plan_prompts(requests: Sequence[str | dict[str, Any]]) -> PromptPlan:
    """Texts stay as they are, STRUCT requests become prompts with fields ordered for shared
    prefixes (GGR over the STRUCT rows of the batch), and the whole batch goes in prefix order.
    The query path and EXPLAIN's reuse estimate both plan with this."""
    texts: list[str] = [r if isinstance(r, str) else "" for r in requests]
    structured = [i for i, r in enumerate(requests) if isinstance(r, dict)]
    for i, prompt in zip(structured, prompts_for([requests[i] for i in structured])):
        texts[i] = prompt
    return PromptPlan(texts, prefix_order(texts))
