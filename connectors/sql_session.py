"""SQL statements run on the server for a remote caller: a locked-down DuckDB, on the caller's behalf.

Why this exists: the Serving UI's SQL tab, and any client of the statement routes
(``serving/api/statements.py``), run DuckDB queries that call ``ai_query``/``ai_embed`` inside the
server process. The server's files, extensions and Python objects are not the caller's, and
neither are endpoints the caller may not query. So every statement gets:

- a fresh in-memory DuckDB with external access off (no files, no ``ATTACH`` of the registry, no
  ``COPY TO``, no extension installs), Python replacement scans off (``FROM some_name`` cannot read
  the server's Python objects), one thread, a memory cap, and its configuration locked;
- the tables the operator chose to share (``SQLINFER_SQL_DATA``: a folder of ``.csv``/``.parquet``
  files, each a table named after the file), loaded before the lock;
- a :class:`CallerClient` in front of the serving client: every AI call checks the caller's
  CAN_QUERY on the endpoint it names before anything is sent, and lists only what they may see.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import duckdb

from ai_functions.explain import Estimate, totals
from ai_functions.stats import StatsSnapshot
from connectors.duckdb import AIFunctions, SqlError, explain, register, translate_error
from engine.errors import SqlinferError

log = logging.getLogger("sqlinfer.sql")

MEMORY_LIMIT = os.environ.get("SQLINFER_SQL_MEMORY_LIMIT", "1GB")
SHARED_SUFFIXES = {".csv": "read_csv_auto", ".parquet": "read_parquet"}


class CallerClient:
    """A serving client that acts only as far as one caller may: ``may_query(name)`` raises unless
    the caller holds CAN_QUERY on ``name``; ``visible()`` is the set of names they may view.

    Every method that names an endpoint checks it (``task`` included: it would tell whether a
    hidden endpoint exists). ``on_call`` sets the caller's identity on the thread making the call
    (DuckDB may call a UDF from a thread of its own), so limits and usage rows are theirs."""

    def __init__(self, inner: Any, may_query: Callable[[str], None], visible: Callable[[], set[str]],
                 on_call: Callable[[], None]):
        self._inner, self._may_query, self._visible, self._on_call = inner, may_query, visible, on_call
        self._allowed: set[str] = set()
        self._lock = threading.Lock()

    def _check(self, endpoint: str) -> None:
        self._on_call()
        with self._lock:
            if endpoint in self._allowed:
                return
        self._may_query(endpoint)
        with self._lock:
            self._allowed.add(endpoint)

    def endpoints(self):
        visible = self._visible()
        return [(name, task) for name, task in self._inner.endpoints() if name in visible]

    def task(self, endpoint):
        self._check(endpoint)
        return self._inner.task(endpoint)

    def embedding_dimension(self, endpoint):
        self._check(endpoint)
        return self._inner.embedding_dimension(endpoint)

    def warm_up(self, endpoint):
        self._check(endpoint)
        return self._inner.warm_up(endpoint)

    def config_version(self, endpoint):
        self._check(endpoint)
        return self._inner.config_version(endpoint)

    def count_tokens(self, endpoint, requests, kind):
        self._check(endpoint)
        return self._inner.count_tokens(endpoint, requests, kind)

    def throughput(self, endpoint):
        self._check(endpoint)
        return self._inner.throughput(endpoint)

    def rate_limits(self, endpoint):
        self._check(endpoint)
        return self._inner.rate_limits(endpoint)

    def chat(self, endpoint, conversations, options, on_result=None):
        self._check(endpoint)
        return self._inner.chat(endpoint, conversations, options, on_result)

    def complete(self, endpoint, prompts, options, on_result=None):
        self._check(endpoint)
        return self._inner.complete(endpoint, prompts, options, on_result)

    def embed(self, endpoint, texts, on_result=None):
        self._check(endpoint)
        return self._inner.embed(endpoint, texts, on_result)

    def predict(self, endpoint, rows, params=None, on_result=None):
        self._check(endpoint)
        return self._inner.predict(endpoint, rows, params, on_result)

    def stream(self, endpoint, request, options, chat):
        self._check(endpoint)
        return self._inner.stream(endpoint, request, options, chat)


def shared_tables() -> dict[str, Path]:
    """The operator's shared tables: ``SQLINFER_SQL_DATA``'s .csv/.parquet files by table name."""
    folder = os.environ.get("SQLINFER_SQL_DATA")
    if not folder:
        return {}
    return {path.stem: path for path in sorted(Path(folder).glob("*")) if path.suffix in SHARED_SUFFIXES
            and path.stem.replace("_", "").isalnum()}


def sandboxed(client: CallerClient, embedding_dimension: int | None) -> tuple[duckdb.DuckDBPyConnection, AIFunctions]:
    """A new in-memory DuckDB with the AI functions on ``client``, the shared tables, and nothing else."""
    con = duckdb.connect(":memory:", config={"threads": 1, "memory_limit": MEMORY_LIMIT,
                                             "autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                             "python_enable_replacements": False})
    ai = register(con, client, embedding_dimension=embedding_dimension)
    for name, path in shared_tables().items():
        try:
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM {SHARED_SUFFIXES[path.suffix]}(?)', [str(path)])
        except duckdb.Error as exc:  # a SqlinferError: the statement FAILS saying which file (not where it lives)
            con.close()
            reason = str(exc).replace(str(path.parent), "SQLINFER_SQL_DATA")
            raise SqlError(f"the shared table {name!r} ({path.name} in SQLINFER_SQL_DATA) cannot be read: {reason}; "
                           f"the operator fixes or removes the file") from None
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con, ai


@dataclass
class Column:
    name: str
    type_text: str
    position: int


@dataclass
class StatementResult:
    columns: list[Column]
    rows: list[list[str | None]]  # JSON_ARRAY format: every value as text, NULL as null
    total_row_count: int
    truncated: bool


@dataclass
class Plan:
    """EXPLAIN of a statement's AI calls: one estimate per call site, and their sum."""

    calls: list[Estimate]
    tokens: int  # input and at most output, of every call
    cost: float | None  # None when a call that sends something has no price


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class Statement:
    """One statement's run: state, progress (the AI functions' counters) and result.

    A terminal state, once set, is final: ``cancel`` and the run's outcome take ``_lock``, so a
    statement a client saw CANCELED never turns SUCCEEDED or FAILED afterwards (nor the reverse)."""

    statement_id: str
    owner: str
    text: str
    row_limit: int
    state: str = "PENDING"  # PENDING, RUNNING, SUCCEEDED, FAILED, CANCELED (Databricks' states)
    error: SqlinferError | None = None
    result: StatementResult | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # Set by cancel(). The AI call in hand reads it (engine.cancellation, set on the calling thread
    # by the CallerClient's on_call): DuckDB hands a UDF up to 2048 rows and notices an interrupt
    # only when it returns, so without it every request of that chunk would still be sent and paid.
    canceled: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _con: duckdb.DuckDBPyConnection | None = None
    _ai: AIFunctions | None = None

    def progress(self) -> StatsSnapshot:
        return self._ai.stats.snapshot() if self._ai is not None else StatsSnapshot()

    def run(self, client: CallerClient, embedding_dimension: int | None) -> None:
        """Run to the end (on a thread of its own); never raises: the outcome is the state."""
        try:
            self._con, self._ai = sandboxed(client, embedding_dimension)
            if not self._settle("RUNNING"):
                return
            relation = self._con.sql(self.text)
            self._settle("SUCCEEDED", result=_collect(relation, self.row_limit) if relation is not None
                         else StatementResult([], [], 0, False))
        except duckdb.InterruptException:
            self._settle("CANCELED")
        except duckdb.Error as exc:  # (no connection yet: sandboxed() itself failed)
            self._settle("FAILED", error=translate_error(self._con, exc) if self._con is not None else SqlError(str(exc)))
        except SqlinferError as exc:
            self._settle("FAILED", error=exc)
        except Exception:  # a bug in sqlinfer: the statement still ends (a client polls until it does)
            log.exception("SQL statement %s failed", self.statement_id)
            self._settle("FAILED", error=SqlinferError("internal error in sqlinfer; the server log has the details"))
        finally:
            self.finished = time.time()
            con, self._con = self._con, None
            if con is not None:
                con.close()
            self.done.set()

    def _settle(self, state: str, result: StatementResult | None = None, error: SqlinferError | None = None) -> bool:
        """Move to ``state`` unless the statement was canceled meanwhile; whether it moved."""
        with self._lock:
            if self.state == "CANCELED":
                return False
            self.state, self.result, self.error = state, result, error
            return True

    def cancel(self) -> None:
        with self._lock:
            if self.state not in ("PENDING", "RUNNING"):
                return
            self.state = "CANCELED"
            self.canceled.set()
            con = self._con
        if con is not None:
            con.interrupt()


def _collect(relation: duckdb.DuckDBPyRelation, row_limit: int) -> StatementResult:
    columns = [Column(name, str(kind), position) for position, (name, kind) in enumerate(zip(relation.columns, relation.types))]
    table = relation.to_arrow_table()  # a DuckDB 2.0 relation runs again on every call: once
    kept = table.slice(0, row_limit)
    values = [kept.column(i).to_pylist() for i in range(kept.num_columns)]  # by position: names may repeat
    rows = [[_text(column[r]) for column in values] for r in range(kept.num_rows)]
    return StatementResult(columns, rows, table.num_rows, table.num_rows > row_limit)


def plan(client: CallerClient, embedding_dimension: int | None, text: str) -> Plan:
    """What ``text`` would send and cost, with no model called (connectors.duckdb.explain)."""
    con, ai = sandboxed(client, embedding_dimension)
    try:
        try:
            estimates = explain(con, text, ai)
        except duckdb.Error as exc:
            raise translate_error(con, exc) from None
    finally:
        con.close()
    tokens, cost = totals(estimates)
    return Plan(estimates, tokens, cost)
