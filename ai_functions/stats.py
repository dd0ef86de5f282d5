"""What a query did: rows, distinct requests, tokens, errors, time — and a live progress bar.

One :class:`QueryStats` belongs to a registered set of SQL functions (a DuckDB connection, a Spark
session). Counters are updated from whatever thread finishes a request (DuckDB worker threads, the
engine's loop thread), so every update takes a lock. The progress bar is tqdm on stderr: it works
in a terminal and in notebooks, and stays out of the way of a table printed on stdout.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class StatsSnapshot:
    rows: int = 0
    null_rows: int = 0
    requests: int = 0  # distinct requests sent and paid for (after dedupe, store hits excluded)
    deduplicated: int = 0  # rows answered by an identical request of the same batch
    cache_hits: int = 0  # rows answered from a result store, here or on the server (nothing paid)
    repaired: int = 0  # rows whose answer did not fit the type and was fixed by asking again
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens the local engine reused from its prefix cache
    wall_seconds: float = 0.0
    tokens_by_endpoint: dict[str, list[int]] = field(default_factory=dict)  # endpoint -> [input, output]
    cost: float | None = None  # in the price's currency, when every endpoint used has a price
    aggregate_groups: int = 0  # groups ai_agg / ai_summarize_agg reduced
    aggregate_rounds: int = 0  # the most rounds (chunk, summarize, combine) any of them took

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        cost = f", cost {self.cost:.6f}" if self.cost is not None else ""
        # what the local engine reported reusing from its prefix cache (explain estimates it before)
        reused = f" ({self.cached_prompt_tokens} prompt tokens reused from the prefix cache)" if self.cached_prompt_tokens else ""
        return (
            f"{self.rows} rows ({self.null_rows} NULL, {self.cache_hits} from the result store, "
            f"{self.deduplicated} answered by an identical request, "
            f"{self.errors} errors), {self.requests} requests, {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} generated tokens{reused}{cost}, {self.rows_per_second:.1f} rows/s, "
            f"{self.wall_seconds:.1f} s wall"
            + (f"; ai_agg: {self.aggregate_groups} groups in up to {self.aggregate_rounds} rounds" if self.aggregate_groups else "")
        )


def prices_from_env(variable: str = "SQLINFER_PRICES") -> dict[str, tuple[float, float]]:
    """``SQLINFER_PRICES="endpoint=0.15/0.60,other=1/2"``: per million input/output tokens.
    ``SQLINFER_BATCH_PRICES`` has the same form: the prices of provider batch mode."""
    prices: dict[str, tuple[float, float]] = {}
    for item in filter(None, (part.strip() for part in os.environ.get(variable, "").split(","))):
        try:
            endpoint, pair = item.split("=", 1)
            given, produced = pair.split("/", 1)
            prices[endpoint.strip()] = (float(given), float(produced))
        except ValueError:
            raise ValueError(f"{variable} entry {item!r} must look like endpoint=INPUT/OUTPUT "
                             f"(prices per million tokens, e.g. my-endpoint=0.15/0.60)") from None
    return prices


@dataclass
class QueryStats:
    _totals: StatsSnapshot = field(default_factory=StatsSnapshot)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _first_call: float | None = None
    _last_done: float | None = None
    _bar: Any = None
    prices: dict[str, tuple[float, float]] = field(default_factory=prices_from_env)
    # Endpoints answered through provider batch APIs since the last reset, costed at these prices
    # (SQLINFER_BATCH_PRICES) instead (connectors.duckdb.execute_batched sets them).
    batch_prices: dict[str, tuple[float, float] | None] = field(default_factory=dict)

    def set_price(self, endpoint: str, input_per_million: float, output_per_million: float) -> None:
        """Price one endpoint's tokens so summaries report cost."""
        self.prices[endpoint] = (float(input_per_million), float(output_per_million))

    def tally(self, endpoint: str) -> "Tally":
        """A per-batch counter for answers as they arrive (see :class:`Tally`)."""
        return Tally(self, endpoint)

    def _merge(self, endpoint: str, rows: int, errors: int, prompt_tokens: int, completion_tokens: int,
               cached: int = 0, requests: int = 0, hits: int = 0) -> None:
        with self._lock:
            totals = self._totals
            totals.cached_prompt_tokens += cached
            totals.requests += requests
            totals.cache_hits += hits
            totals.rows += rows
            totals.errors += errors
            totals.prompt_tokens += prompt_tokens
            totals.completion_tokens += completion_tokens
            pair = totals.tokens_by_endpoint.setdefault(endpoint, [0, 0])
            pair[0] += prompt_tokens
            pair[1] += completion_tokens
            self._last_done = time.perf_counter()
            if self._bar is not None and rows:
                self._bar.update(rows)
                self._bar.set_postfix(tokens=totals.completion_tokens, refresh=False)

    def reset(self) -> None:
        with self._lock:
            self._totals = StatsSnapshot()
            self._first_call = self._last_done = None
            self.batch_prices = {}

    def batch_started(self) -> None:
        with self._lock:
            if self._first_call is None:
                self._first_call = time.perf_counter()

    def add(self, **counts: int) -> None:
        """Add to counters; ``rows`` also advances the progress bar."""
        with self._lock:
            for name, value in counts.items():
                setattr(self._totals, name, getattr(self._totals, name) + value)
            self._last_done = time.perf_counter()
            if self._bar is not None and counts.get("rows"):
                self._bar.update(counts["rows"])
                self._bar.set_postfix(tokens=self._totals.completion_tokens, refresh=False)

    def aggregated(self, groups: int, rounds: int) -> None:
        """``groups`` reduced by an aggregate, the longest in ``rounds`` rounds."""
        with self._lock:
            self._totals.aggregate_groups += groups
            self._totals.aggregate_rounds = max(self._totals.aggregate_rounds, rounds)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            snap = StatsSnapshot(**(vars(self._totals) | {
                "tokens_by_endpoint": {k: list(v) for k, v in self._totals.tokens_by_endpoint.items()}}))
            used = snap.tokens_by_endpoint
            batched = set(self.batch_prices)
            prices = {e: p for e, p in self.prices.items() if e not in batched} | {
                e: p for e, p in self.batch_prices.items() if p is not None}
            if used and all(e in prices for e in used):
                snap.cost = sum(i * prices[e][0] / 1e6 + o * prices[e][1] / 1e6 for e, (i, o) in used.items())
            if self._first_call is not None and self._last_done is not None:
                snap.wall_seconds = self._last_done - self._first_call
            return snap

    @contextmanager
    def progress(self, total: int | None = None, description: str = "ai rows") -> Iterator["QueryStats"]:
        """Show a progress bar on stderr while the block runs (``total`` rows if known)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=description, unit="row", file=sys.stderr, dynamic_ncols=True)
        with self._lock:
            self._bar = bar
        try:
            yield self
        finally:
            with self._lock:
                self._bar = None
            bar.close()


class Tally:
    """Counts one batch's answers without taking the stats lock per answer.

    Answers arrive one by one (from the engine's loop thread, provider threads); taking a lock
    and updating the bar for each cost ~4 us per row, more than the rest of ai_query on an
    instant endpoint. A tally merges into the query's stats every 0.1 s and at the end, so the
    progress bar still moves while a long batch runs.
    """

    __slots__ = ("stats", "endpoint", "rows", "errors", "prompt", "completion", "cached", "requests", "hits", "_last",
                 "_lock")

    def __init__(self, stats: QueryStats, endpoint: str):
        self.stats, self.endpoint = stats, endpoint
        self.rows = self.errors = self.prompt = self.completion = self.cached = self.requests = self.hits = 0
        self._last = time.perf_counter()
        self._lock = threading.Lock()  # provider threads report concurrently; never contended long

    def add(self, rows: int, result: Any) -> None:
        """One distinct request's answer, shared by ``rows`` rows. An answer from a result store (this
        process's or the server's) counts as a store hit: no request, no tokens, no cost."""
        with self._lock:
            self.rows += rows
            if result.error:
                self.errors += rows
            if result.from_store:
                self.hits += rows
            else:
                self.requests += 1
                self.prompt += result.prompt_tokens
                self.completion += getattr(result, "completion_tokens", 0)
                self.cached += getattr(result, "cached_tokens", 0)
            now = time.perf_counter()
            due = now - self._last > 0.1
            if due:
                self._last = now
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            counts = (self.rows, self.errors, self.prompt, self.completion, self.cached, self.requests, self.hits)
            self.rows = self.errors = self.prompt = self.completion = self.cached = self.requests = self.hits = 0
        if any(counts):
            self.stats._merge(self.endpoint, *counts)
