"""Rate limits that hold for REST queries and SQL jobs alike, across processes.

An endpoint's limits come from ``ai_gateway.rate_limits`` and the legacy ``rate_limits``:
``calls`` and/or ``tokens`` per ``minute``, keyed by ``endpoint`` (everyone together) or ``user``.
Counters live in the registry's SQLite database in fixed one-minute windows, and admission is
one ``BEGIN IMMEDIATE`` transaction (check and count together), so several server workers, the
CLI and notebooks share one budget instead of each keeping its own.

Calls are counted when admitted; tokens (prompt + completion) are charged when the answers come
back, and a window whose token budget is spent admits nothing more. Over the limit, REST callers
get ``429 REQUEST_LIMIT_EXCEEDED`` with ``Retry-After``; SQL callers (``mode = "wait"``) wait for
the next window and carry on, so a long ``ai_query`` job slows down instead of failing.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from serving.data.backends import Backend, DelegatingBackend, ResultCallback
from serving.control.db import Database
from serving.errors import RequestLimitExceeded

WINDOW_SECONDS = 60

# Who is calling and how to behave at the limit; set by the REST layer, defaults for in-process SQL.
current_user: contextvars.ContextVar[str] = contextvars.ContextVar("sqlinfer_user", default="embedded")
limit_mode: contextvars.ContextVar[str] = contextvars.ContextVar("sqlinfer_limit_mode", default="wait")



@dataclass(frozen=True)
class Limit:
    calls: int | None
    tokens: int | None
    key: str  # "endpoint" or "user"

    def principal(self, user: str) -> str:
        return user if self.key == "user" else "*"


def limits_from(rate_limits: Sequence[dict[str, Any]]) -> list[Limit]:
    return [Limit(r.get("calls"), r.get("tokens"), r.get("key", "user")) for r in rate_limits
            if r.get("key", "user") in ("user", "endpoint")]


class RateLimiter:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time):
        self.db, self.clock = db, clock

    def _window(self) -> tuple[int, float]:
        now = self.clock()
        start = int(now // WINDOW_SECONDS) * WINDOW_SECONDS
        return start, start + WINDOW_SECONDS - now

    def acquire(self, endpoint_id: str, limits: Sequence[Limit], user: str, wanted: int) -> tuple[int, float]:
        """Admit up to ``wanted`` calls now: (admitted, seconds until the next window)."""
        window, remaining = self._window()
        with self.db.write() as con:
            admitted = wanted
            for limit in limits:
                row = con.execute("SELECT calls, tokens FROM rate_usage WHERE endpoint_id = ? AND principal = ? AND window_start = ?",
                                  (endpoint_id, limit.principal(user), window)).fetchone()
                calls, tokens = (row["calls"], row["tokens"]) if row else (0, 0)
                if limit.tokens is not None and tokens >= limit.tokens:
                    admitted = 0
                if limit.calls is not None:
                    admitted = min(admitted, max(0, limit.calls - calls))
            if admitted:
                for principal in {limit.principal(user) for limit in limits}:
                    self._add(con, endpoint_id, principal, window, calls=admitted)
            con.execute("DELETE FROM rate_usage WHERE window_start < ?", (window - 2 * WINDOW_SECONDS,))
        return admitted, remaining

    def charge_tokens(self, endpoint_id: str, limits: Sequence[Limit], user: str, tokens: int) -> None:
        if not tokens or not any(limit.tokens is not None for limit in limits):
            return
        window, _ = self._window()
        with self.db.write() as con:
            for principal in {limit.principal(user) for limit in limits if limit.tokens is not None}:
                self._add(con, endpoint_id, principal, window, tokens=tokens)

    @staticmethod
    def _add(con, endpoint_id: str, principal: str, window: int, calls: int = 0, tokens: int = 0) -> None:
        con.execute(
            "INSERT INTO rate_usage VALUES (?, ?, ?, ?, ?) ON CONFLICT(endpoint_id, principal, window_start) "
            "DO UPDATE SET calls = calls + excluded.calls, tokens = tokens + excluded.tokens",
            (endpoint_id, principal, window, calls, tokens),
        )


class RateLimitedBackend(DelegatingBackend):
    """An endpoint's backend behind its rate limits: admits requests in the sizes the limits allow."""

    def __init__(self, inner: Backend, limiter: RateLimiter, endpoint_id: str, endpoint_name: str,
                 limits: Sequence[Limit], sleep: Callable[[float], None] = time.sleep):
        super().__init__(inner)
        self.limiter, self.endpoint_id, self.endpoint_name = limiter, endpoint_id, endpoint_name
        self.limits, self._sleep = list(limits), sleep

    def _admitted(self, items: Sequence[Any], call: Callable[[list[Any], ResultCallback | None], list[Any]],
                  on_result: ResultCallback | None) -> list[Any]:
        user = current_user.get()
        results: list[Any] = [None] * len(items)
        pending = list(range(len(items)))
        while pending:
            admitted, wait = self.limiter.acquire(self.endpoint_id, self.limits, user, len(pending))
            if admitted == 0:
                if limit_mode.get() == "refuse":
                    raise RequestLimitExceeded(
                        f"rate limit of endpoint {self.endpoint_name!r} reached for this minute; retry in {wait:.0f} s",
                        retry_after_seconds=wait,
                    )
                self._sleep(min(wait + 0.01, WINDOW_SECONDS))
                continue
            batch, pending = pending[:admitted], pending[admitted:]

            def forward(local: int, result: Any, batch=batch) -> None:
                if on_result is not None:
                    on_result(batch[local], result)

            answers = call([items[i] for i in batch], forward if on_result else None)
            used = sum(a.prompt_tokens + getattr(a, "completion_tokens", 0) for a in answers)
            self.limiter.charge_tokens(self.endpoint_id, self.limits, user, used)
            for position, answer in zip(batch, answers):
                results[position] = answer
        return results

    def chat(self, conversations, options, on_result=None):
        return self._admitted(conversations, lambda part, cb: self.inner.chat(part, options, cb), on_result)

    def complete(self, prompts, options, on_result=None):
        return self._admitted(prompts, lambda part, cb: self.inner.complete(part, options, cb), on_result)

    def embed(self, texts, on_result=None):
        return self._admitted(texts, lambda part, cb: self.inner.embed(part, cb), on_result)

    def stream(self, request, options, chat):
        user = current_user.get()
        while True:
            admitted, wait = self.limiter.acquire(self.endpoint_id, self.limits, user, 1)
            if admitted:
                break
            if limit_mode.get() == "refuse":
                raise RequestLimitExceeded(
                    f"rate limit of endpoint {self.endpoint_name!r} reached for this minute; retry in {wait:.0f} s",
                    retry_after_seconds=wait)
            self._sleep(min(wait + 0.01, WINDOW_SECONDS))
        last = None
        try:
            for last in self.inner.stream(request, options, chat):
                yield last
        finally:
            if last is not None:
                self.limiter.charge_tokens(self.endpoint_id, self.limits, user, last.prompt_tokens + last.completion_tokens)

    def predict(self, rows, params=None, on_result=None):
        return self._admitted(rows, lambda part, cb: self.inner.predict(part, params, cb), on_result)
