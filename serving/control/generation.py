"""Registry reads the gateway makes on every request, answered from memory until the registry changes.

A query needs its caller's token, the caller's permission on the endpoint, the endpoint's
serving config and, with group rate limits, the caller's groups. Asking SQLite for each, on
every request, is what a gateway must not do on its hot path. So they are cached, and every
cache entry is tagged with the registry's *config generation*:

- SQLite triggers (schema version 10) add one to ``config_generation`` whenever a table that
  decides who may do what changes: endpoints, permissions, tokens, secrets and their ACLs,
  groups and their members, service principals, entitlements, local models. Usage rows, rate
  counters and logs do not count: they change on every request.
- This process learns the new value at once when it made the change itself (every write
  transaction reads it after its commit), and within ``SQLINFER_CONFIG_REFRESH_SECONDS``
  (default 0.05 s) when another process did (a second server worker, the CLI, a notebook): a
  daemon thread polls the one-row table.
- An entry whose tag is not the current generation is loaded again.

So a revoked token, a permission change or a config update takes effect at the next request in
the process that made it, and within one refresh interval everywhere else.

Inside :func:`memory_only` a cache miss raises :class:`NotCached` instead of reading SQLite:
the REST server's event loop answers from memory and does the (rare) loads on a worker thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

log = logging.getLogger("sqlinfer.registry")

# The tables whose changes can change an answer the caches give (schema version 10 triggers on them).
WATCHED_TABLES = ("endpoints", "permissions", "tokens", "secret_scopes", "secrets", "secret_acls", "secret_generation",
                  "entitlements", "groups", "group_members", "service_principals", "local_models")

_memory_only: contextvars.ContextVar[bool] = contextvars.ContextVar("sqlinfer_memory_only", default=False)


class NotCached(Exception):
    """A cache was asked, inside :func:`memory_only`, for something it must read from SQLite."""


@contextlib.contextmanager
def memory_only() -> Iterator[None]:
    """Within this block, caches answer from memory or raise :class:`NotCached`."""
    token = _memory_only.set(True)
    try:
        yield
    finally:
        _memory_only.reset(token)


def refresh_seconds() -> float:
    return float(os.environ.get("SQLINFER_CONFIG_REFRESH_SECONDS", "0.05"))


def migration() -> str:
    """Schema version 10: the counter and its triggers."""
    statements = ["CREATE TABLE config_generation (id INTEGER PRIMARY KEY CHECK (id = 1), generation INTEGER NOT NULL)",
                  "INSERT INTO config_generation VALUES (1, 0)"]
    for table in WATCHED_TABLES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            statements.append(f"CREATE TRIGGER config_changed_{table}_{event.lower()} AFTER {event} ON {table} "
                              f"BEGIN UPDATE config_generation SET generation = generation + 1 WHERE id = 1; END")
    return ";\n".join(statements) + ";"


class ConfigGeneration:
    """The registry's config generation as this process knows it (one per database file)."""

    def __init__(self, path: Path):
        self.path = path
        self.value = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.refresh_from(self._poll_connection())
        threading.Thread(target=self._poll, name="sqlinfer-config-watch", daemon=True).start()

    def _poll_connection(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA busy_timeout=30000")
        self._con = con
        return con

    def refresh_from(self, con: sqlite3.Connection) -> None:
        """Read the counter on ``con`` (after a commit of this process, or by the poller)."""
        row = con.execute("SELECT generation FROM config_generation WHERE id = 1").fetchone()
        if row is not None:
            with self._lock:  # only forward: a slow poll must not undo a commit's newer value
                if row[0] > self.value:
                    self.value = row[0]

    def _poll(self) -> None:
        while True:
            try:
                time.sleep(refresh_seconds())
            except ValueError:  # a malformed SQLINFER_CONFIG_REFRESH_SECONDS: the default, not a dead watcher
                time.sleep(0.05)
            try:
                self.refresh_from(self._con)
            except Exception:  # noqa: BLE001  (nothing may end the watcher: caches would go stale for good)
                log.warning("could not read the config generation of %s; retrying", self.path, exc_info=True)


_WATCHES: dict[str, ConfigGeneration] = {}
_WATCHES_LOCK = threading.Lock()


def generation_of(path: Path) -> ConfigGeneration:
    """The watcher of one registry file in this process, started on first use."""
    key = str(Path(path).resolve())
    with _WATCHES_LOCK:
        watch = _WATCHES.get(key)
        if watch is None:
            watch = _WATCHES[key] = ConfigGeneration(Path(key))
        return watch


def after_commit(key: str, con: sqlite3.Connection) -> None:
    """A write transaction of this process committed on the file ``key`` (its resolved path):
    take a config change into account now."""
    watch = _WATCHES.get(key)
    if watch is not None:
        watch.refresh_from(con)


class GenerationCache:
    """``key -> value`` answers, each valid while the config generation it was loaded at lasts.

    Bounded: past ``max_entries`` it starts over (a caller spraying random tokens cannot grow it).
    """

    def __init__(self, path: Path, max_entries: int = 4096):
        self.watch = generation_of(path)
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[int, Any]] = {}

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        generation = self.watch.value
        entry = self._entries.get(key)
        if entry is not None and entry[0] == generation:
            return entry[1]
        if _memory_only.get():
            raise NotCached(key)
        value = load()  # raises for what is not there (a 404 is not cached: it is cheap and rare)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (generation, value)  # tagged with the generation read *before* loading
        return value
