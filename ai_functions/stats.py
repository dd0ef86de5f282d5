"""What a query did: rows, distinct requests, tokens, errors, time — and a live progress bar.

One :class:`QueryStats` belongs to a registered set of SQL functions (a DuckDB connection, a Spark
session). Counters are updated from whatever thread finishes a request (DuckDB worker threads, the
engine's loop thread), so every update takes a lock. The progress bar is tqdm on stderr: it works
in a terminal and in notebooks, and stays out of the way of a table printed on stdout.
"""

from __future__ import annotations

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

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.rows} rows ({self.null_rows} NULL, {self.deduplicated} deduplicated, "
            f"{self.errors} errors), {self.requests} requests, {self.prompt_tokens} prompt + "
            f"{self.completion_tokens} generated tokens, {self.rows_per_second:.1f} rows/s, "
            f"{self.wall_seconds:.1f} s wall"
        )


@dataclass
class QueryStats:
    _totals: StatsSnapshot = field(default_factory=StatsSnapshot)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _first_call: float | None = None
    _last_done: float | None = None
    _bar: Any = None

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
            snap = StatsSnapshot(**vars(self._totals))
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
