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
    requests: int = 0  # distinct requests sent to an endpoint (after dedupe)
    deduplicated: int = 0  # rows answered by an identical request of the same batch
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0
    tokens_by_endpoint: dict[str, list[int]] = field(default_factory=dict)  # endpoint -> [input, output]
    cost: float | None = None  # in the price's currency, when every endpoint used has a price

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        cost = f", cost {self.cost:.6f}" if self.cost is not None else ""
        return (
            f"{self.rows} rows ({self.null_rows} NULL, {self.deduplicated} answered by an identical request, "
            f"{self.errors} errors), {self.requests} requests, {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} generated tokens{cost}, {self.rows_per_second:.1f} rows/s, "
            f"{self.wall_seconds:.1f} s wall"
        )


def prices_from_env() -> dict[str, tuple[float, float]]:
    """``SQLINFER_PRICES="endpoint=0.15/0.60,other=1/2"``: per million input/output tokens."""
    prices: dict[str, tuple[float, float]] = {}
    for item in filter(None, (part.strip() for part in os.environ.get("SQLINFER_PRICES", "").split(","))):
        try:
            endpoint, pair = item.split("=", 1)
            given, produced = pair.split("/", 1)
            prices[endpoint.strip()] = (float(given), float(produced))
        except ValueError:
            raise ValueError(f"SQLINFER_PRICES entry {item!r} must look like endpoint=INPUT/OUTPUT "
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

    def set_price(self, endpoint: str, input_per_million: float, output_per_million: float) -> None:
        """Price one endpoint's tokens so summaries report cost."""
        self.prices[endpoint] = (float(input_per_million), float(output_per_million))

    def add_tokens(self, endpoint: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            pair = self._totals.tokens_by_endpoint.setdefault(endpoint, [0, 0])
            pair[0] += prompt_tokens
            pair[1] += completion_tokens

    def reset(self) -> None:
        with self._lock:
            self._totals = StatsSnapshot()
            self._first_call = self._last_done = None

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

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            snap = StatsSnapshot(**(vars(self._totals) | {
                "tokens_by_endpoint": {k: list(v) for k, v in self._totals.tokens_by_endpoint.items()}}))
            used = snap.tokens_by_endpoint
            if used and all(e in self.prices for e in used):
                snap.cost = sum(i * self.prices[e][0] / 1e6 + o * self.prices[e][1] / 1e6 for e, (i, o) in used.items())
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
