"""The durable result store: finished answers are never lost or paid for twice.

Every answer is written to ``$SQLINFER_HOME/results.db`` (SQLite, WAL) *as soon as it arrives*,
one committed row per answer, keyed by a hash of (endpoint, the endpoint's config version, model
parameters, structured-output schema, request). A deterministic request — temperature 0 or a
seed, and every embedding or custom-model request — seen again is answered from the store. So
when a query is killed (even with SIGKILL) and run again, only the rows that had not come back
are sent. Failed answers are not stored: they are tried again.

A config update changes the version and so every key: answers of an old model are never
reused. Several processes may share the file (SQLite's locking). Controls: ``SQLINFER_RESULT_STORE=off``
(or ``functions(con).store = None``) turns it off, ``SQLINFER_RESULT_TTL`` (seconds, default:
forever) ages answers out, ``sqlinfer cache clear [--endpoint E]`` empties it.

:class:`InFlight` is the in-process half of query-wide dedupe: when two chunks (DuckDB runs
several at once) or two partitions in one process ask the same thing at the same time, only the
first sends it and the second waits for its answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    result_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_endpoint ON results (endpoint);
"""


def request_key(endpoint: str, version: str, options: Any, schema: str | None, request: Any) -> str:
    """The hash that identifies one request's answer."""
    text = json.dumps([endpoint, version, options, schema, request], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def answer_keys(endpoint: str, version: str, kind: str, options: Any, requests: Any, params: Any = None) -> list[str]:
    """The store keys of ``requests`` of one kind sent with ``options`` (a SamplingOptions).

    One definition for every side: the SQL functions (running and explaining) and the server
    that answers their batches compute the same keys, so either's stored answer serves the other.
    """
    generating = kind in ("chat", "complete") and options is not None
    sampling = options.model_dump(mode="json", exclude_none=True) if generating else None
    schema = json.dumps(options.json_schema, sort_keys=True) if generating and options.json_schema is not None else None
    if params:  # a custom model's params change its answers (none: the keys the SQL functions use)
        sampling = {"params": params}
    return [request_key(endpoint, version, sampling, schema, r) for r in requests]


def is_deterministic(kind: str, options: Any) -> bool:
    """Whether the same request always gets the same answer, so a stored one may be reused:
    every embedding and custom-model request, and generation at temperature 0 or with a seed."""
    return kind in ("embed", "predict") or options.temperature == 0 or options.seed is not None


class ResultStore:
    def __init__(self, path: Path, ttl_seconds: float | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_seconds = ttl_seconds
        self._local = threading.local()
        con = self._connection()
        con.executescript(SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # a committed row survives a killed process
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """The stored answers among ``keys``: key -> (kind, encoded result)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        oldest = int((time.time() - self.ttl_seconds) * 1000) if self.ttl_seconds else 0
        con = self._connection()
        for start in range(0, len(wanted), 500):
            part = wanted[start:start + 500]
            rows = con.execute(
                f"SELECT key, kind, result_json FROM results WHERE created_ms >= ? AND key IN ({','.join('?' * len(part))})",
                [oldest, *part]).fetchall()
            for key, kind, text in rows:
                found[key] = (kind, json.loads(text))
        return found

    def put(self, key: str, endpoint: str, kind: str, encoded: dict[str, Any]) -> None:
        """Commit one answer now (the caller is the thread that just received it)."""
        self._connection().execute(
            "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
            (key, endpoint, int(time.time() * 1000), kind, json.dumps(encoded)))

    def clear(self, endpoint: str | None = None) -> int:
        con = self._connection()
        if endpoint is None:
            return con.execute("DELETE FROM results").rowcount
        return con.execute("DELETE FROM results WHERE endpoint = ?", (endpoint,)).rowcount

    def count(self, endpoint: str | None = None) -> int:
        con = self._connection()
        if endpoint is None:
            return con.execute("SELECT count(*) FROM results").fetchone()[0]
        return con.execute("SELECT count(*) FROM results WHERE endpoint = ?", (endpoint,)).fetchone()[0]


_STORES: dict[str, ResultStore] = {}
_STORES_LOCK = threading.Lock()


def default_store() -> ResultStore | None:
    """The store in ``$SQLINFER_HOME/results.db``, or None when ``SQLINFER_RESULT_STORE=off``."""
    if os.environ.get("SQLINFER_RESULT_STORE", "on").lower() in ("off", "0", "false", "no"):
        return None
    from engine.model_store import sqlinfer_home

    path = sqlinfer_home() / "results.db"
    ttl = os.environ.get("SQLINFER_RESULT_TTL")
    with _STORES_LOCK:
        store = _STORES.get(str(path))
        if store is None:
            store = _STORES[str(path)] = ResultStore(path, float(ttl) if ttl else None)
        return store


class InFlight:
    """Requests being answered right now in this process, so an identical one waits instead of
    being sent again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[Any]] = {}  # key -> [event, result]

    def claim(self, keys: list[str]) -> tuple[list[int], dict[int, list[Any]]]:
        """Which of ``keys`` this caller must send (indexes), and which it waits for (index -> slot)."""
        mine, theirs = [], {}
        with self._lock:
            for index, key in enumerate(keys):
                slot = self._pending.get(key)
                if slot is None:
                    self._pending[key] = [threading.Event(), None]
                    mine.append(index)
                else:
                    theirs[index] = slot
        return mine, theirs

    def finish(self, key: str, result: Any) -> None:
        with self._lock:
            slot = self._pending.pop(key, None)
        if slot is not None:
            slot[1] = result
            slot[0].set()

    @staticmethod
    def wait(slot: list[Any], timeout: float | None = None) -> Any:
        slot[0].wait(timeout)
        return slot[1]


IN_FLIGHT = InFlight()
