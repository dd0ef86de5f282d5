"""SQL on the server: Databricks' Statement Execution API shape, and EXPLAIN of a statement's AI calls.

The Serving UI's SQL tab uses these, and so can any client: ``databricks-sdk``'s
``w.statement_execution.execute_statement(statement=..., warehouse_id=...)`` speaks this wire.
A statement is DuckDB SQL with ``ai_query``/``ai_embed`` and the task functions, run in a
locked-down DuckDB on the caller's behalf (``connectors.sql_session``: no files, no extensions,
CAN_QUERY checked on every endpoint a call names).

- ``POST /api/2.0/sql/statements`` starts one and waits up to ``wait_timeout`` (``0s`` or
  ``5s``-``50s``) for it; still running then, it answers ``RUNNING`` with the id to poll.
- ``GET /api/2.0/sql/statements/{id}``: state, result, and (a sqlinfer extension)
  ``sqlinfer_progress``: the AI rows, requests, tokens and cost so far, and the summary line.
- ``POST /api/2.0/sql/statements/{id}/cancel``.
- ``POST /api/2.0/sqlinfer/sql/explain`` (a sqlinfer extension): rows, calls, tokens, cost and
  time of every AI call site, with no model called.

A statement is visible only to the user who started it (anyone else gets 404). A user has at most
``SQLINFER_SQL_STATEMENTS_PER_USER`` (4) running at once; finished ones are kept for an hour.
This module sits at the REST edge (it reads ``connectors``); tests/test_layers.py lists it.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import uuid
from typing import Any, Iterator, Literal

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import Field

from connectors.sql_session import CallerClient, Statement, plan
from engine import cancellation
from serving.api.guard import JsonRoute, principal
from serving.api.queries import as_sql_caller, may_query
from serving.control.auth import Principal
from serving.control.wire import Strict
from serving.errors import InvalidParameterValue, ResourceDoesNotExist, ResourceExhausted

KEEP_SECONDS = 3600
KEEP_PER_USER = 50
MAX_ROW_LIMIT = 10_000
MAX_STATEMENT_CHARS = 100_000


class ExecuteStatement(Strict):
    """The body of ``POST /api/2.0/sql/statements`` (Databricks' fields; INLINE JSON_ARRAY only)."""

    statement: str = Field(min_length=1, max_length=MAX_STATEMENT_CHARS)
    warehouse_id: str | None = Field(default=None, description="accepted and ignored: the server is the warehouse")
    wait_timeout: str = Field(default="10s", description="0s, or 5s to 50s")
    on_wait_timeout: Literal["CONTINUE", "CANCEL"] = "CONTINUE"
    row_limit: int = Field(default=1000, ge=1, le=MAX_ROW_LIMIT)
    disposition: Literal["INLINE"] = "INLINE"
    format: Literal["JSON_ARRAY"] = "JSON_ARRAY"


class ExplainStatement(Strict):
    statement: str = Field(min_length=1, max_length=MAX_STATEMENT_CHARS)


def wait_seconds(value: str) -> int:
    match = re.fullmatch(r"(\d{1,2})s", value)
    seconds = int(match.group(1)) if match else -1
    if seconds != 0 and not 5 <= seconds <= 50:
        raise InvalidParameterValue(f"wait_timeout: {value!r} is not allowed; use '0s' (answer at once) or "
                                    f"'5s' to '50s'")
    return seconds


def _setting(name: str, default: str) -> int:
    return int(os.environ.get(name, default))


class Statements:
    """The statements of this server process, by id, and what each user has running.

    Bounds, because a statement is work the server does for whoever asks: a user has at most
    ``SQLINFER_SQL_STATEMENTS_PER_USER`` (4) statements and EXPLAINs running, the server at most
    ``SQLINFER_SQL_STATEMENTS`` (8); each stops after ``SQLINFER_SQL_TIMEOUT_SECONDS`` (600); a
    user's finished statements are kept for an hour, the last ``KEEP_PER_USER`` of them."""

    def __init__(self) -> None:
        self._by_id: dict[str, Statement] = {}
        self._explaining: dict[str, int] = {}
        self._lock = threading.Lock()
        self.dimensions: dict[tuple[str, Any], int | None] = {}  # ai_embed's FLOAT[n] by endpoint and version

    def _admit(self, owner: str) -> None:
        """Refuse a new statement or EXPLAIN of ``owner`` at a limit (the lock is held)."""
        running = [s.owner for s in self._by_id.values() if not s.done.is_set()]
        mine = running.count(owner) + self._explaining.get(owner, 0)
        everyone = len(running) + sum(self._explaining.values())
        if mine >= _setting("SQLINFER_SQL_STATEMENTS_PER_USER", "4"):
            message = (f"user {owner!r} has {mine} statements or EXPLAINs running, the most allowed "
                       f"(SQLINFER_SQL_STATEMENTS_PER_USER); wait for one or cancel it")
        elif everyone >= _setting("SQLINFER_SQL_STATEMENTS", "8"):
            message = (f"the server is running {everyone} statements, the most it runs at once "
                       f"(SQLINFER_SQL_STATEMENTS); try again shortly")
        else:
            return
        error = ResourceExhausted(message)
        error.retry_after_seconds = 5
        raise error

    def add(self, statement: Statement) -> None:
        with self._lock:
            now = time.time()
            mine = sorted((s for s in self._by_id.values() if s.owner == statement.owner and s.finished is not None),
                          key=lambda s: s.finished)
            for old in [s for s in self._by_id.values() if s.finished is not None and now - s.finished > KEEP_SECONDS] \
                    + mine[:max(0, len(mine) - KEEP_PER_USER + 1)]:
                self._by_id.pop(old.statement_id, None)
            self._admit(statement.owner)
            self._by_id[statement.statement_id] = statement

    @contextlib.contextmanager
    def explaining(self, owner: str) -> Iterator[None]:
        """Count an EXPLAIN against ``owner``'s running statements while it runs."""
        with self._lock:
            self._admit(owner)
            self._explaining[owner] = self._explaining.get(owner, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._explaining[owner] -= 1

    def get(self, statement_id: str, who: Principal) -> Statement:
        statement = self._by_id.get(statement_id)
        if statement is None or statement.owner != who.user_name:
            raise ResourceDoesNotExist(f"no statement {statement_id!r} of yours; statements are kept for "
                                       f"{KEEP_SECONDS // 60} minutes after they finish")
        return statement


async def _wait(statement: Statement, seconds: float) -> bool:
    """Wait for ``statement`` without holding a thread (a thread per waiting client would starve
    the control plane's few); whether it finished."""
    deadline = time.monotonic() + seconds
    while not statement.done.is_set() and time.monotonic() < deadline:
        await anyio.sleep(0.05)
    return statement.done.is_set()


def caller_client(request: Request, who: Principal, cancel: threading.Event | None = None) -> CallerClient:
    """The serving client as ``who``: CAN_QUERY per endpoint, their identity on every call, and
    the statement's ``cancel`` event (set, the backends start nothing more of the batch in hand)."""
    service = request.app.state.service

    def on_call() -> None:
        as_sql_caller(who)
        cancellation.CANCEL.set(cancel)

    return CallerClient(request.app.state.query_client, lambda name: may_query(request, who, name),
                        lambda: {view["name"] for view in service.list(who)}, on_call,
                        request.app.state.statements.dimensions)


def response(statement: Statement) -> dict[str, Any]:
    body: dict[str, Any] = {"statement_id": statement.statement_id, "status": {"state": statement.state}}
    if statement.error is not None:
        body["status"]["error"] = {"error_code": statement.error.error_code, "message": statement.error.message}
    if statement.result is not None:
        result = statement.result
        body["manifest"] = {
            "format": "JSON_ARRAY",
            "schema": {"column_count": len(result.columns),
                       "columns": [{"name": c.name, "type_text": c.type_text, "position": c.position} for c in result.columns]},
            "total_row_count": result.total_row_count,
            "truncated": result.truncated,
        }
        body["result"] = {"chunk_index": 0, "row_offset": 0, "row_count": len(result.rows), "data_array": result.rows}
    snapshot = statement.progress()
    body["sqlinfer_progress"] = {
        "ai_rows": snapshot.rows, "requests": snapshot.requests, "errors": snapshot.errors,
        "input_tokens": snapshot.prompt_tokens, "output_tokens": snapshot.completion_tokens, "cost": snapshot.cost,
        "elapsed_seconds": round((statement.finished or time.time()) - statement.started, 3),
        "summary": snapshot.summary() if snapshot.rows else None,
    }
    return body


def explain_threads(request: Request) -> "anyio.CapacityLimiter":
    limiter = getattr(request.app.state, "explain_threads", None)
    if limiter is None:
        limiter = request.app.state.explain_threads = anyio.CapacityLimiter(_setting("SQLINFER_SQL_STATEMENTS", "8"))
    return limiter


def router() -> APIRouter:
    api = APIRouter(tags=["sql statements"], dependencies=[Depends(principal)], route_class=JsonRoute)

    def registry(request: Request) -> Statements:
        return request.app.state.statements

    @api.post("/api/2.0/sql/statements", summary="Run a DuckDB statement with AI functions (CAN_QUERY on each endpoint it calls)")
    async def execute(body: ExecuteStatement, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        wait = wait_seconds(body.wait_timeout)
        statement = Statement(statement_id=str(uuid.uuid4()), owner=who.user_name, text=body.statement, row_limit=body.row_limit)
        statements = registry(request)
        client = caller_client(request, who, statement.canceled)
        statements.add(statement)  # nothing after this can fail: a statement added is always started
        threading.Thread(target=statement.run, args=(client, _setting("SQLINFER_SQL_TIMEOUT_SECONDS", "600")),
                         name=f"sql-{statement.statement_id[:8]}", daemon=True).start()
        if wait:
            finished = await _wait(statement, wait)
            if not finished and body.on_wait_timeout == "CANCEL":
                statement.cancel()
                await _wait(statement, 5)
        return response(statement)

    @api.get("/api/2.0/sql/statements/{statement_id}", summary="A statement's state, progress and result (its owner)")
    def get(statement_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        return response(registry(request).get(statement_id, who))

    @api.post("/api/2.0/sql/statements/{statement_id}/cancel", summary="Cancel a running statement (its owner)")
    def cancel(statement_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        registry(request).get(statement_id, who).cancel()
        return {}

    @api.post("/api/2.0/sqlinfer/sql/explain", summary="Rows, calls, tokens, cost and time of a statement's AI calls; no model is called")
    async def explain(body: ExplainStatement, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
        client = caller_client(request, who)
        with registry(request).explaining(who.user_name):
            # Its own threads: EXPLAIN runs the query's scans, and must not take the control plane's.
            planned = await anyio.to_thread.run_sync(plan, client, body.statement, _setting("SQLINFER_SQL_TIMEOUT_SECONDS", "600"),
                                                     who.user_name, limiter=explain_threads(request))
        return {
            "calls": [{"function": e.function, "endpoint": e.endpoint, "rows": e.rows, "distinct_requests": e.distinct_requests,
                       "cache_hits": e.cache_hits, "to_send": e.to_send, "input_tokens": e.input_tokens,
                       "output_tokens": e.output_tokens, "tokens_exact": e.tokens_exact, "cost": e.cost,
                       "seconds": e.seconds, "limited_by": e.limited_by, "line": e.line()} for e in planned.calls],
            "totals": {"rows": sum(e.rows for e in planned.calls), "to_send": sum(e.to_send for e in planned.calls),
                       "tokens": planned.tokens, "cost": planned.cost,
                       "seconds": sum(e.seconds for e in planned.calls) if all(e.seconds is not None for e in planned.calls) else None},
        }

    return api
