"""SQL statements run on the server for a remote caller: a locked-down DuckDB, on the caller's behalf.

Why this exists: the Serving UI's SQL tab, and any client of the statement routes
(``serving/api/statements.py``), run DuckDB queries that call ``ai_query``/``ai_embed`` inside the
server process. The server's files, extensions and Python objects are not the caller's, and
neither are endpoints the caller may not query. So every statement gets:

- a fresh in-memory DuckDB with external access off (no files, no ``ATTACH`` of the registry, no
  ``COPY TO``, no extension installs), Python replacement scans off (``FROM some_name`` cannot read
  the server's Python objects), no spilling to disk, no persistent secrets, one thread, a memory
  cap for DuckDB's own buffers, and its configuration locked;
- a result read batch by batch: at most ``row_limit`` rows and ``SQLINFER_SQL_RESULT_BYTES``
  (25 MiB, Databricks' INLINE limit) are kept, the rest only counted, so a huge result costs
  one batch of memory, not the whole table;
- the tables the operator chose to share (``SQLINFER_SQL_DATA``: a folder of ``.csv``/``.parquet``
  files, each a view named after the file, readable through ``allowed_paths`` and nothing else);
- a :class:`CallerClient` in front of the serving client: every AI call checks the caller's
  CAN_QUERY on the endpoint it names before anything is sent, and lists only what they may see.
"""

from __future__ import annotations

import hashlib
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
from engine.errors import ResourceDoesNotExist, SqlinferError

log = logging.getLogger("sqlinfer.sql")
INTERNAL_MESSAGE = "internal error in sqlinfer; the server log has the details"


SHARED_SUFFIXES = {".csv": "read_csv_auto", ".parquet": "read_parquet"}
BATCH_ROWS = 2048


def result_bytes() -> int:
    return int(os.environ.get("SQLINFER_SQL_RESULT_BYTES", str(25 * 1024 * 1024)))


def memory_limit() -> str:
    """DuckDB's buffer cap per statement, read when the statement starts (as the other settings)."""
    return os.environ.get("SQLINFER_SQL_MEMORY_LIMIT", "1GB")


class StatementTimeout(SqlinferError):
    """A statement (or its EXPLAIN) ran past SQLINFER_SQL_TIMEOUT_SECONDS on the server."""

    error_code = "STATEMENT_TIMEOUT"
    http_status = 400


class CallerClient:
    """A serving client that acts only as far as one caller may: ``may_query(name)`` raises unless
    the caller holds CAN_QUERY on ``name``; ``visible()`` is the set of names they may view.

    Every method that names an endpoint checks it (``task`` included: it would describe an
    endpoint the caller may not query; the check itself answers 404 or 403 as the REST routes
    do). ``on_call`` sets the caller's identity on the thread making the call
    (DuckDB may call a UDF from a thread of its own), so limits and usage rows are theirs."""

    def __init__(self, inner: Any, may_query: Callable[[str], None], visible: Callable[[], set[str]],
                 on_call: Callable[[], None], dimensions: dict[tuple[str, Any], int | None] | None = None):
        self._inner, self._may_query, self._visible, self._on_call = inner, may_query, visible, on_call
        # Embedding dimensions by (endpoint, config version), shared by the server's statements:
        # every statement registers ai_embed, and finding a bundled model's dimension may load it.
        self._dimensions = dimensions if dimensions is not None else {}
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

    def _call(self, method: str, endpoint: str, *args: Any) -> Any:
        self._check(endpoint)
        try:
            return getattr(self._inner, method)(endpoint, *args)
        except ResourceDoesNotExist:
            # Deleted after the check: the in-process message lists every endpoint, hidden ones too.
            raise ResourceDoesNotExist(f"endpoint {endpoint!r} does not exist (it was deleted while the statement "
                                       f"ran); list yours with GET /api/2.0/serving-endpoints") from None

    def endpoints(self):
        visible = self._visible()
        return [(name, task) for name, task in self._inner.endpoints() if name in visible]

    def task(self, endpoint):
        return self._call('task', endpoint)

    def embedding_dimension(self, endpoint):
        key = (endpoint, self._call("config_version", endpoint))  # checked; a config update is a new key
        if key not in self._dimensions:
            self._dimensions[key] = self._call("embedding_dimension", endpoint)
        return self._dimensions[key]

    def warm_up(self, endpoint):
        return self._call('warm_up', endpoint)

    def config_version(self, endpoint):
        return self._call('config_version', endpoint)

    def count_tokens(self, endpoint, requests, kind):
        return self._call('count_tokens', endpoint, requests, kind)

    def prefix_reuse(self, endpoint, requests, kind):
        return self._call('prefix_reuse', endpoint, requests, kind)

    def throughput(self, endpoint):
        return self._call('throughput', endpoint)

    def rate_limits(self, endpoint):
        return self._call('rate_limits', endpoint)

    def chat(self, endpoint, conversations, options, on_result=None):
        return self._call('chat', endpoint, conversations, options, on_result)

    def complete(self, endpoint, prompts, options, on_result=None):
        return self._call('complete', endpoint, prompts, options, on_result)

    def embed(self, endpoint, texts, on_result=None):
        return self._call('embed', endpoint, texts, on_result)

    def predict(self, endpoint, rows, params=None, on_result=None):
        return self._call('predict', endpoint, rows, params, on_result)

    def stream(self, endpoint, request, options, chat):
        return self._call('stream', endpoint, request, options, chat)


def shared_tables() -> dict[str, Path]:
    """The operator's shared tables: ``SQLINFER_SQL_DATA``'s .csv/.parquet files by table name."""
    folder = os.environ.get("SQLINFER_SQL_DATA")
    if not folder:
        return {}
    return {path.stem: path for path in sorted(Path(folder).glob("*")) if path.suffix in SHARED_SUFFIXES
            and path.stem.replace("_", "").isalnum()}


class CallerStore:
    """The result store as one caller's: their own answers are found again (a re-run pays nothing
    twice), other users' are not, so nobody learns from a cache hit, a zero cost or EXPLAIN's
    ``cache_hits`` that someone else asked the same thing. Keys are salted with the caller."""

    def __init__(self, inner: Any, caller: str):
        self._inner, self._salt = inner, hashlib.sha256(caller.encode()).hexdigest()

    def scope(self, key: str) -> str:
        """``key`` as this caller's (ai_functions also keys its in-flight dedupe with it)."""
        return hashlib.sha256(f"{self._salt}:{key}".encode()).hexdigest()

    def get_many(self, keys: Any) -> dict[str, Any]:
        scoped = {self.scope(key): key for key in keys}
        return {scoped[key]: found for key, found in self._inner.get_many(scoped).items()}

    def put(self, key: str, endpoint: str, kind: str, encoded: dict[str, Any]) -> None:
        self._inner.put(self.scope(key), endpoint, kind, encoded)


def sandboxed(client: CallerClient, caller: str | None = None) -> tuple[duckdb.DuckDBPyConnection, AIFunctions]:
    """A new in-memory DuckDB with the AI functions on ``client``, the shared tables, and nothing else.

    ``ai_embed``'s FLOAT[n] is read from the embedding endpoints this caller may query, when the
    statement starts (an endpoint added since then counts at once). Answers are kept in the
    result store under ``caller``'s own keys (:class:`CallerStore`); no caller, no store."""
    con = duckdb.connect(":memory:", config={"threads": 1, "memory_limit": memory_limit(), "temp_directory": "",
                                             "autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                             "allow_persistent_secrets": False, "python_enable_replacements": False})
    ai = register(con, client)
    ai.store = CallerStore(ai.store, caller) if ai.store is not None and caller is not None else None
    shared = shared_tables()
    if shared:  # views, read when a query reads them: a large shared file costs nothing to the others
        con.execute("SET allowed_paths = ?", [[str(path) for path in shared.values()]])
    for name, path in shared.items():
        try:
            con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {SHARED_SUFFIXES[path.suffix]}(\'{_quoted(path)}\')')
        except duckdb.Error as exc:  # a SqlinferError: the statement FAILS saying which file (not where it lives)
            con.close()
            reason = str(exc).replace(str(path.parent), "SQLINFER_SQL_DATA")
            raise SqlError(f"the shared table {name!r} ({path.name} in SQLINFER_SQL_DATA) cannot be read: {reason}; "
                           f"the operator fixes or removes the file") from None
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con, ai


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")  # a view's text holds the path as a literal (no parameters in DDL)


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

    def run(self, client: CallerClient, timeout_seconds: float | None = None) -> None:
        """Run to the end (on a thread of its own); never raises: the outcome is the state.

        Past ``timeout_seconds`` the statement is cancelled and FAILS with STATEMENT_TIMEOUT. The
        connection is closed before the outcome is set, so a client that sees the outcome can
        start its next statement at once (its slot is free)."""
        outcome: tuple[str, StatementResult | None, SqlinferError | None] = ("CANCELED", None, None)
        timer = threading.Timer(timeout_seconds, self._time_out, args=(timeout_seconds,)) if timeout_seconds else None
        try:
            self._con, self._ai = sandboxed(client, self.owner)
            if self._settle("RUNNING"):  # (not if it was cancelled while the connection was made)
                if timer is not None:
                    timer.start()
                relation = self._con.sql(self.text)
                outcome = ("SUCCEEDED", _collect(relation, self.row_limit, self.canceled) if relation is not None
                           else StatementResult([], [], 0, False), None)
        except duckdb.InterruptException:
            outcome = ("CANCELED", None, None)
        except duckdb.Error as exc:  # (no connection yet: sandboxed() itself failed)
            outcome = ("FAILED", None, _reported(translate_error(self._con, exc) if self._con is not None else SqlError(str(exc)),
                                                 self.statement_id))
        except SqlinferError as exc:
            outcome = ("FAILED", None, _reported(exc, self.statement_id))
        except Exception:  # a bug in sqlinfer: the statement still ends (a client polls until it does)
            log.exception("SQL statement %s failed", self.statement_id)
            outcome = ("FAILED", None, SqlinferError(INTERNAL_MESSAGE))
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                con, self._con = self._con, None
            if con is not None:
                con.close()
        try:
            self._settle(*outcome)
        finally:
            self.finished = time.time()
            self.done.set()

    def _time_out(self, seconds: float) -> None:
        self.cancel(StatementTimeout(f"the statement ran past {seconds:g} s (SQLINFER_SQL_TIMEOUT_SECONDS) and was "
                                     f"stopped; filter the rows, or run it with sqlinfer sql on your machine"))

    def _settle(self, state: str, result: StatementResult | None = None, error: SqlinferError | None = None) -> bool:
        """Move to ``state`` unless the statement was canceled (or timed out) meanwhile; whether it moved."""
        with self._lock:
            if self.canceled.is_set():
                return False
            self.result, self.error = result, error
            self.state = state  # last: a poll that sees the state sees its result or error
            return True

    def cancel(self, reason: SqlinferError | None = None) -> None:
        """Stop it: CANCELED, or FAILED with ``reason`` (a timeout)."""
        with self._lock:
            if self.state not in ("PENDING", "RUNNING"):
                return
            self.error = reason
            self.state = "FAILED" if reason is not None else "CANCELED"
            self.canceled.set()
            if self._con is not None:  # under the lock: run() closes the connection under it too
                self._con.interrupt()


def _collect(relation: duckdb.DuckDBPyRelation, row_limit: int, canceled: threading.Event | None = None) -> StatementResult:
    """The first ``row_limit`` rows (and at most ``result_bytes()`` of text); the rest only counted.

    DuckDB forgets an interrupt that arrives between two queries, or before the reader starts:
    ``canceled`` is checked before every batch, so such a cancel or timeout still stops it."""
    columns = [Column(name, str(kind), position) for position, (name, kind) in enumerate(zip(relation.columns, relation.types))]
    rows: list[list[str | None]] = []
    total, size, full, budget = 0, 0, False, result_bytes()
    for batch in relation.to_arrow_reader(BATCH_ROWS):  # a DuckDB 2.0 relation runs again on every call: once
        if canceled is not None and canceled.is_set():
            raise duckdb.InterruptException("the statement was cancelled")
        total += batch.num_rows
        if full:
            continue
        values = [batch.column(i).to_pylist() for i in range(batch.num_columns)]  # by position: names may repeat
        for r in range(batch.num_rows):
            row = [_text(column[r]) for column in values]
            size += sum(len(v) for v in row if v is not None)
            if len(rows) >= row_limit or size > budget:
                full = True
                break
            rows.append(row)
    return StatementResult(columns, rows, total, total > len(rows))


def _reported(error: SqlinferError, statement_id: str) -> SqlinferError:
    """``error`` as the caller may see it: a bare SqlinferError is a bug of ours (INTERNAL_ERROR),
    logged here and answered with the generic message, never with its own text."""
    if type(error) is SqlinferError:
        log.error("SQL statement %s failed inside an AI function: %s", statement_id, error.message)
        return SqlinferError(INTERNAL_MESSAGE)
    if isinstance(error, SqlError):  # DuckDB's own words may name the server's folders
        for folder, shown in ((os.environ.get("SQLINFER_HOME"), "$SQLINFER_HOME"), (str(Path.home()), "~")):
            if folder and len(folder) > 1 and folder in error.message:  # (HOME=/ in containers)
                error = SqlError(error.message.replace(folder, shown))
    return error


def _interrupt(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.interrupt()
    except duckdb.Error:  # closed meanwhile: EXPLAIN ended as the timer fired
        pass


def plan(client: CallerClient, text: str, timeout_seconds: float | None = None, caller: str | None = None) -> Plan:
    """What ``text`` would send and cost, with no model called (connectors.duckdb.explain); past
    ``timeout_seconds`` it stops with STATEMENT_TIMEOUT."""
    con, ai = sandboxed(client, caller)
    timer = threading.Timer(timeout_seconds, _interrupt, args=(con,)) if timeout_seconds else None
    try:
        if timer is not None:
            timer.start()
        try:
            estimates = explain(con, text, ai)
        except duckdb.InterruptException:
            raise StatementTimeout(f"EXPLAIN ran past {timeout_seconds:g} s (SQLINFER_SQL_TIMEOUT_SECONDS) and was "
                                   f"stopped; filter the rows") from None
        except duckdb.Error as exc:
            raise _reported(translate_error(con, exc), "(explain)") from None
    finally:
        if timer is not None:
            timer.cancel()
        con.close()
    tokens, cost = totals(estimates)
    return Plan(estimates, tokens, cost)
