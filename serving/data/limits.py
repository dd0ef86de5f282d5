"""Rate limits that hold for REST queries and SQL jobs alike, across processes.

An endpoint's limits come from ``ai_gateway.rate_limits`` and the legacy ``rate_limits``:
``calls`` and/or ``tokens`` per ``minute``, keyed as in Databricks' AI Gateway:

* ``endpoint``: everyone together, always;
* ``user`` without ``principal``: the default, each caller its own budget;
* ``user`` or ``service_principal`` with ``principal``: that caller's own budget, replacing the
  default and any group limit;
* ``user_group`` with ``principal``: one budget shared by the group's members, replacing the
  default; a caller in several limited groups is refused only when every one of them is spent.
Counters live in the registry's SQLite database in fixed one-minute windows, and admission is
one ``BEGIN IMMEDIATE`` transaction (check and count together), so several server workers, the
CLI and notebooks share one budget instead of each keeping its own.

Calls are counted when admitted; tokens (prompt + completion) are charged when the answers come
back, and a window whose token budget is spent admits nothing more. Over the limit, REST callers
get ``429 REQUEST_LIMIT_EXCEEDED`` with ``Retry-After``; SQL callers (``mode = "wait"``) wait for
the next window and carry on, so a long ``ai_query`` job slows down instead of failing.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from serving.data.backends import Backend, DelegatingBackend, ResultCallback, async_like_inner
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
    key: str  # endpoint, user, user_group or service_principal
    principal: str | None = None  # who a custom limit is for (a user, group or application id)


@dataclass(frozen=True)
class Counted:
    """One limit and the counter row it is checked against (``*``, a caller, or ``group:NAME``)."""

    limit: Limit
    counter: str


@dataclass(frozen=True)
class Applicable:
    """The limits one caller is held to: all of ``required``, and one of the ``groups`` (if any)."""

    required: tuple[Counted, ...]
    groups: tuple[tuple[Counted, ...], ...]  # per limited group: its limits

    def __bool__(self) -> bool:
        return bool(self.required or self.groups)


@dataclass(frozen=True)
class Admission:
    admitted: int
    wait_seconds: float
    counters: tuple[Counted, ...]  # what the admitted calls were counted on (tokens are charged there)


def limits_from(rate_limits: Sequence[dict[str, Any]]) -> list[Limit]:
    return [Limit(r.get("calls"), r.get("tokens"), r.get("key", "user"), r.get("principal")) for r in rate_limits]


def applicable(limits: Sequence[Limit], user: str, groups: Sequence[str]) -> Applicable:
    """Which of an endpoint's limits hold for ``user`` (a member of ``groups``), Databricks' way."""
    required = [Counted(limit, "*") for limit in limits if limit.key == "endpoint"]
    own = [Counted(limit, user) for limit in limits
           if limit.key in ("user", "service_principal") and limit.principal == user]
    by_group: dict[str, list[Counted]] = {}
    for limit in limits:
        if limit.key == "user_group" and limit.principal in groups:
            by_group.setdefault(limit.principal, []).append(Counted(limit, "group:" + limit.principal))
    if own:
        return Applicable(tuple(required + own), ())
    if by_group:
        return Applicable(tuple(required), tuple(tuple(group) for group in by_group.values()))
    default = [Counted(limit, user) for limit in limits if limit.key == "user" and limit.principal is None]
    return Applicable(tuple(required + default), ())


class RateLimiter:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time):
        from serving.control.generation import GenerationCache

        self.db, self.clock = db, clock
        self._groups = GenerationCache(db.path)  # asked per request when a limit names a group

    def _window(self) -> tuple[int, float]:
        now = self.clock()
        start = int(now // WINDOW_SECONDS) * WINDOW_SECONDS
        return start, start + WINDOW_SECONDS - now

    def groups_of(self, user: str) -> list[str]:
        return self._groups.get(user, lambda: self._load_groups(user))

    def _load_groups(self, user: str) -> list[str]:
        rows = self.db.read().execute("SELECT group_name FROM group_members WHERE member = ?", (user,)).fetchall()
        return ["users"] + [row["group_name"] for row in rows]  # everyone is in ``users``

    def acquire(self, endpoint_id: str, limits: Applicable, wanted: int) -> Admission:
        """Admit up to ``wanted`` calls now, counted on the caller's counters (one transaction)."""
        window, remaining = self._window()
        with self.db.write() as con:
            def room(counted: Sequence[Counted]) -> int:
                admitted = wanted
                for item in counted:
                    row = con.execute("SELECT calls, tokens FROM rate_usage WHERE endpoint_id = ? AND principal = ? "
                                      "AND window_start = ?", (endpoint_id, item.counter, window)).fetchone()
                    calls, tokens = (row["calls"], row["tokens"]) if row else (0, 0)
                    if item.limit.tokens is not None and tokens >= item.limit.tokens:
                        admitted = 0
                    if item.limit.calls is not None:
                        admitted = min(admitted, max(0, item.limit.calls - calls))
                return admitted

            admitted, counters = room(limits.required), list(limits.required)
            if limits.groups:  # the limited group with the most room left carries the calls
                best = max(limits.groups, key=room)
                admitted = min(admitted, room(best))
                counters += best
            if admitted:
                for counter in {item.counter for item in counters}:
                    self._add(con, endpoint_id, counter, window, calls=admitted)
            con.execute("DELETE FROM rate_usage WHERE window_start < ?", (window - 2 * WINDOW_SECONDS,))
        return Admission(admitted, remaining, tuple(counters))

    def charge_tokens(self, endpoint_id: str, counters: Sequence[Counted], tokens: int) -> None:
        charged = {item.counter for item in counters if item.limit.tokens is not None}
        if not tokens or not charged:
            return
        window, _ = self._window()
        with self.db.write() as con:
            for counter in charged:
                self._add(con, endpoint_id, counter, window, tokens=tokens)

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

    def _caller_limits(self) -> Applicable:
        user = current_user.get()
        groups = self.limiter.groups_of(user) if any(limit.key == "user_group" for limit in self.limits) else []
        return applicable(self.limits, user, groups)

    native_async = property(async_like_inner)

    def _refused(self, wait: float) -> RequestLimitExceeded:
        return RequestLimitExceeded(
            f"rate limit of endpoint {self.endpoint_name!r} reached for this minute; retry in {wait:.0f} s",
            retry_after_seconds=wait)

    async def _aadmitted(self, items: Sequence[Any], call: Callable[[list[Any]], Any]) -> list[Any]:
        """:meth:`_admitted` for an async caller. The counters are SQLite rows shared by every
        process (that is what keeps a limit exact across workers), so admitting and charging
        run on a worker thread, never on the loop."""
        limits = self._caller_limits()
        if not limits:
            return await call(list(items))
        results: list[Any] = [None] * len(items)
        pending = list(range(len(items)))
        while pending:
            admission = await asyncio.to_thread(self.limiter.acquire, self.endpoint_id, limits, len(pending))
            if admission.admitted == 0:
                if limit_mode.get() == "refuse":
                    raise self._refused(admission.wait_seconds)
                await asyncio.sleep(min(admission.wait_seconds + 0.01, WINDOW_SECONDS))
                continue
            batch, pending = pending[:admission.admitted], pending[admission.admitted:]
            answers = await call([items[i] for i in batch])
            used = sum(a.prompt_tokens + getattr(a, "completion_tokens", 0) for a in answers)
            if used and any(item.limit.tokens is not None for item in admission.counters):
                await asyncio.to_thread(self.limiter.charge_tokens, self.endpoint_id, admission.counters, used)
            for position, answer in zip(batch, answers):
                results[position] = answer
        return results

    async def achat(self, conversations, options):
        return await self._aadmitted(conversations, lambda part: self.inner.achat(part, options))

    async def acomplete(self, prompts, options):
        return await self._aadmitted(prompts, lambda part: self.inner.acomplete(part, options))

    async def aembed(self, texts):
        return await self._aadmitted(texts, lambda part: self.inner.aembed(part))

    def _admitted(self, items: Sequence[Any], call: Callable[[list[Any], ResultCallback | None], list[Any]],
                  on_result: ResultCallback | None) -> list[Any]:
        limits = self._caller_limits()
        if not limits:
            return call(list(items), on_result)
        results: list[Any] = [None] * len(items)
        pending = list(range(len(items)))
        while pending:
            admission = self.limiter.acquire(self.endpoint_id, limits, len(pending))
            admitted, wait = admission.admitted, admission.wait_seconds
            if admitted == 0:
                if limit_mode.get() == "refuse":
                    raise self._refused(wait)
                self._sleep(min(wait + 0.01, WINDOW_SECONDS))
                continue
            batch, pending = pending[:admitted], pending[admitted:]

            def forward(local: int, result: Any, batch=batch) -> None:
                if on_result is not None:
                    on_result(batch[local], result)

            answers = call([items[i] for i in batch], forward if on_result else None)
            used = sum(a.prompt_tokens + getattr(a, "completion_tokens", 0) for a in answers)
            self.limiter.charge_tokens(self.endpoint_id, admission.counters, used)
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
        limits = self._caller_limits()
        if not limits:
            yield from self.inner.stream(request, options, chat)
            return
        while True:
            admission = self.limiter.acquire(self.endpoint_id, limits, 1)
            wait = admission.wait_seconds
            if admission.admitted:
                break
            if limit_mode.get() == "refuse":
                raise self._refused(wait)
            self._sleep(min(wait + 0.01, WINDOW_SECONDS))
        last = None
        try:
            for last in self.inner.stream(request, options, chat):
                yield last
        finally:
            if last is not None:
                self.limiter.charge_tokens(self.endpoint_id, admission.counters, last.prompt_tokens + last.completion_tokens)

    def predict(self, rows, params=None, on_result=None):
        return self._admitted(rows, lambda part, cb: self.inner.predict(part, params, cb), on_result)
