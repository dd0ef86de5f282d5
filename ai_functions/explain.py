"""EXPLAIN for AI functions, and budgets: what a query will cost before any model is called.

A connector runs the query once in *planning* mode: the SQL functions record what they would
send (:class:`Planner`) and return NULLs, so the query's own scans, joins and filters run but no
model does. :func:`estimate` then reports, per ``ai_query``/``ai_embed`` call (endpoint and
arguments): rows, distinct requests, how many the result store already holds, input tokens
(counted with the model's own tokenizer where the model is local; ~4 characters per token for
external providers, flagged as approximate), output tokens (at most ``max_tokens`` per request
sent), cost (prices per million tokens: ``SQLINFER_PRICES`` or ``stats.set_price``), and time
(the endpoint's rate limits and its throughput measured from the usage log), and for
chat/completions on a local engine the prompt tokens its prefix cache will reuse
(``engine.prefix_reuse``: the batch ordered as it will be sent, shared prefixes rounded down to
whole KV blocks), or why there is no such estimate.

Known limit: a query whose later AI calls depend on earlier AI answers (``WHERE ai_query(...) =
'x'``) is planned with NULL answers, so the dependent calls may be under-counted.

Budgets (:class:`Budget`, ``max_cost`` / ``max_tokens`` per query) are checked against the
estimate before any call, and again before every batch while the query runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ai_functions.errors import BudgetExceeded
from ai_functions.ordering import plan_prompts
from ai_functions.functions import KIND_OF_TASK, _dedupe, request_options, store_keys
from serving.data.result_store import is_deterministic
from serving.data.result_store import ResultStore
from ai_functions.spec import OutputSpec
from engine.errors import SqlinferError
from engine.prefix_reuse import PrefixReuse

CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Budget:
    max_cost: float | None = None
    max_tokens: int | None = None

    def check(self, tokens: int, cost: float | None, when: str) -> None:
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise BudgetExceeded(f"{when}: {tokens} tokens exceed max_tokens = {self.max_tokens}; "
                                 f"raise the budget, filter the rows, or lower modelParameters.max_tokens")
        if self.max_cost is not None:
            if cost is None:
                raise BudgetExceeded(f"{when}: max_cost = {self.max_cost} is set but an endpoint "
                                     f"has no price; set it with SQLINFER_PRICES=endpoint=INPUT/OUTPUT (per million tokens)")
            if cost > self.max_cost:
                raise BudgetExceeded(f"{when}: estimated cost {cost:.6f} exceeds max_cost = "
                                     f"{self.max_cost}; raise the budget, filter the rows, or lower modelParameters.max_tokens")


@dataclass
class PlannedCall:
    function: str
    endpoint: str
    parameters: str | None
    spec: OutputSpec | None
    rows: int = 0
    null_rows: int = 0
    requests: list[Any] = field(default_factory=list)


class Planner:
    """Records what the AI functions of a query would send (thread-safe: DuckDB runs chunks in parallel)."""

    def __init__(self) -> None:
        self.calls: dict[tuple[Any, ...], PlannedCall] = {}
        self._lock = threading.Lock()

    def record(self, function: str, endpoints: list[Any], requests: list[Any], parameters: list[Any],
               spec: OutputSpec | None) -> None:
        with self._lock:
            for endpoint, request, parameter in zip(endpoints, requests, parameters):
                if endpoint is None:
                    continue
                key = (function, endpoint, parameter, spec)
                call = self.calls.get(key)
                if call is None:
                    call = self.calls[key] = PlannedCall(function, endpoint, parameter, spec)
                call.rows += 1
                if request is None:
                    call.null_rows += 1
                else:
                    call.requests.append(request)


@dataclass
class Estimate:
    function: str
    endpoint: str
    rows: int
    distinct_requests: int
    cache_hits: int
    to_send: int
    input_tokens: int
    output_tokens: int
    tokens_exact: bool  # counted with the model's tokenizer (False: ~4 characters per token)
    cost: float | None
    seconds: float | None
    limited_by: str
    # chat/completions only: what the engine's prefix cache will reuse once the batch is ordered
    prefix_reuse: PrefixReuse | None = None

    def line(self) -> str:
        cost = f"{self.cost:.6f}" if self.cost is not None else "no price"
        seconds = f"~{self.seconds:.1f} s" if self.seconds is not None else "unknown (no measured throughput yet)"
        approx = "" if self.tokens_exact else " (approx.)"
        return (f"{self.function}({self.endpoint!r}): {self.rows} rows, {self.distinct_requests} distinct requests, "
                f"{self.cache_hits} in the result store, {self.to_send} to send; input tokens {self.input_tokens}{approx}, "
                f"output tokens <= {self.output_tokens}; cost {cost}; time {seconds} ({self.limited_by})"
                + (f"; {self.prefix_reuse.describe()}" if self.prefix_reuse is not None else ""))


def estimate(client: Any, planner: Planner, store: ResultStore | None, prices: dict[str, tuple[float, float]]) -> list[Estimate]:
    estimates = []
    for call in planner.calls.values():
        kind = KIND_OF_TASK[client.task(call.endpoint)]
        options = request_options(call.parameters, call.spec, kind)
        distinct, _ = _dedupe(call.requests)
        hits = 0
        version = client.config_version(call.endpoint)
        remaining = distinct
        if store is not None and version is not None and is_deterministic(kind, options) and distinct:
            keys = store_keys(call.endpoint, version, kind, options, call.spec, distinct)
            found = store.get_many(keys)
            hits = sum(1 for k in keys if k in found)
            remaining = [r for r, k in zip(distinct, keys) if k not in found]
        plan = plan_prompts(remaining) if kind in ("chat", "complete") else None
        # chat/completions are counted as the prompts the model is sent (STRUCTs rendered as fields),
        # planned exactly as the query path sends them: fields by GGR, the batch in prefix order
        sent = plan.sent() if plan is not None else remaining
        reuse = client.prefix_reuse(call.endpoint, sent, kind) if plan is not None and remaining else None
        if reuse is not None and reuse.unknown_because is None:
            counted: list[int] | None = [reuse.prompt_tokens]  # the reuse estimate tokenized them already
        else:
            counted = client.count_tokens(call.endpoint, sent, kind) if remaining and kind != "predict" else []
        exact = counted is not None
        if counted is None:
            counted = [max(1, len(str(r)) // CHARS_PER_TOKEN) for r in sent]
        input_tokens = sum(counted) if kind != "predict" else 0
        output_tokens = len(remaining) * (options.max_tokens or 0) if kind in ("chat", "complete") else 0
        price = prices.get(call.endpoint)
        cost = (input_tokens * price[0] + output_tokens * price[1]) / 1e6 if price else (0.0 if not remaining else None)
        seconds, limited_by = _duration(client, call.endpoint, len(remaining), input_tokens + output_tokens)
        estimates.append(Estimate(call.function, call.endpoint, call.rows, len(distinct), hits, len(remaining),
                                  input_tokens, output_tokens, exact, cost, seconds, limited_by, reuse))
    return estimates


def _duration(client: Any, endpoint: str, requests: int, tokens: int) -> tuple[float | None, str]:
    if requests == 0:
        return 0.0, "nothing to send"
    bounds = []
    throughput = client.throughput(endpoint)
    if throughput:
        bounds.append((requests / throughput, f"measured {throughput:.1f} requests/s"))
    for limit in client.rate_limits(endpoint):
        if limit.get("calls"):
            bounds.append((requests / limit["calls"] * 60, f"rate limit {limit['calls']} calls/minute"))
        if limit.get("tokens"):
            bounds.append((tokens / limit["tokens"] * 60, f"rate limit {limit['tokens']} tokens/minute"))
    if not bounds:
        return None, "no throughput measured and no rate limit"
    return max(bounds)


def totals(estimates: list[Estimate]) -> tuple[int, float | None]:
    """(tokens, cost) of a whole query; cost None if any call that sends something has no price."""
    tokens = sum(e.input_tokens + e.output_tokens for e in estimates)
    costs = [e.cost for e in estimates]
    return tokens, (None if any(c is None for c in costs) else sum(costs))
