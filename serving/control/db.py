"""The registry's SQLite database: schema, migrations, and transactions that all-or-nothing.

Why SQLite: it is the embedded default, it ships with Python, and with WAL and ``BEGIN
IMMEDIATE`` several processes (a server, the CLI, a notebook) can write the same registry
safely. Every change to the registry runs in :meth:`Database.write`, one transaction, so a
request that fails half-way changes nothing.

The schema is versioned: ``MIGRATIONS[i]`` takes the database from version ``i`` to ``i + 1``,
recorded in ``PRAGMA user_version``. New versions append; old ones are never edited.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

def _generation_migration() -> str:
    from serving.control.generation import migration

    return migration()


MIGRATIONS: list[str] = [
    # 1: the registry
    """
    CREATE TABLE endpoints (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        creator TEXT NOT NULL,
        creation_timestamp INTEGER NOT NULL,
        last_updated_timestamp INTEGER NOT NULL,
        state_ready TEXT NOT NULL,
        state_config_update TEXT NOT NULL,
        config_json TEXT,              -- the config serving now (NULL until the first one is ready)
        pending_config_json TEXT,      -- the config being deployed, or the last one that failed
        config_version INTEGER NOT NULL,
        route_optimized INTEGER NOT NULL DEFAULT 0,
        description TEXT,
        rate_limits_json TEXT,
        ai_gateway_json TEXT
    );
    CREATE TABLE endpoint_config_history (
        endpoint_id TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
        config_version INTEGER NOT NULL,
        config_json TEXT NOT NULL,
        outcome TEXT NOT NULL,         -- IN_PROGRESS, READY or UPDATE_FAILED
        created_timestamp INTEGER NOT NULL,
        PRIMARY KEY (endpoint_id, config_version)
    );
    CREATE TABLE endpoint_tags (
        endpoint_id TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT,
        PRIMARY KEY (endpoint_id, key)
    );
    CREATE TABLE permissions (
        endpoint_id TEXT NOT NULL,
        principal TEXT NOT NULL,
        level TEXT NOT NULL,
        PRIMARY KEY (endpoint_id, principal)
    );
    CREATE TABLE secret_scopes (
        name TEXT PRIMARY KEY,
        created_timestamp INTEGER NOT NULL
    );
    CREATE TABLE secrets (
        scope TEXT NOT NULL REFERENCES secret_scopes(name) ON DELETE CASCADE,
        key TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        last_updated_timestamp INTEGER NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        user_name TEXT NOT NULL,
        is_admin INTEGER NOT NULL,
        comment TEXT,
        creation_timestamp INTEGER NOT NULL
    );
    CREATE TABLE local_models (
        name TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        task TEXT NOT NULL,
        creation_timestamp INTEGER NOT NULL
    );
    """,
    # 2: rate-limit counters shared by every process (serving.data.limits)
    """
    CREATE TABLE rate_usage (
        endpoint_id TEXT NOT NULL,
        principal TEXT NOT NULL,       -- a user name, or '*' for endpoint-wide limits
        window_start INTEGER NOT NULL, -- unix seconds, a multiple of 60
        calls INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (endpoint_id, principal, window_start)
    );
    """,
    # 3: usage tracking and inference tables (serving.data.usage)
    """
    CREATE TABLE usage (
        request_id TEXT PRIMARY KEY,
        timestamp_ms INTEGER NOT NULL,
        endpoint_name TEXT NOT NULL,
        endpoint_id TEXT NOT NULL,
        served_entity TEXT,
        requester TEXT NOT NULL,
        source TEXT NOT NULL,          -- rest or sql
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        status_code INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        client_request_id TEXT,
        usage_context TEXT,            -- JSON
        error TEXT
    );
    CREATE INDEX usage_by_endpoint ON usage (endpoint_name, timestamp_ms);
    CREATE TABLE inference_payloads (
        request_id TEXT PRIMARY KEY,
        endpoint_name TEXT NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        request_json TEXT NOT NULL,
        response_json TEXT NOT NULL
    );
    """,
    # 4: secret scope ACLs (serving.control.secrets) and entitlements (serving.control.auth).
    # Scopes created before this version have no ACL entries: only admins use them, as before.
    """
    CREATE TABLE secret_acls (
        scope TEXT NOT NULL REFERENCES secret_scopes(name) ON DELETE CASCADE,
        principal TEXT NOT NULL,       -- a user name, or 'users' for every user
        permission TEXT NOT NULL,      -- READ, WRITE or MANAGE
        PRIMARY KEY (scope, principal)
    );
    CREATE TABLE entitlements (
        principal TEXT NOT NULL,
        entitlement TEXT NOT NULL,     -- e.g. create-serving-endpoints
        PRIMARY KEY (principal, entitlement)
    );
    """,
    # 5: a counter of changes to secrets and their ACLs. Backends holding a resolved provider key
    # are rebuilt when it moves, so a rotated secret or a revoked READ takes effect at once.
    """
    CREATE TABLE secret_generation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        generation INTEGER NOT NULL
    );
    INSERT INTO secret_generation VALUES (1, 0);
    """,
    # 6: tokens may expire (POST /api/2.0/token/create with lifetime_seconds)
    """
    ALTER TABLE tokens ADD COLUMN expiry_time INTEGER;
    """,
    # 7: budget policy ids, and each served entity's build and server logs (the logs routes)
    """
    ALTER TABLE endpoints ADD COLUMN budget_policy_id TEXT;
    CREATE TABLE entity_logs (
        endpoint_id TEXT NOT NULL,     -- an endpoint's id, or a system endpoint's name
        entity_name TEXT NOT NULL,
        kind TEXT NOT NULL,            -- build (deployment) or server (engine, serving)
        timestamp_ms INTEGER NOT NULL,
        line TEXT NOT NULL
    );
    CREATE INDEX entity_logs_by_entity ON entity_logs (endpoint_id, entity_name, kind, timestamp_ms);
    """,
    # 8: governance: groups and their members, service principals (tokens that belong to an
    # application), and what a guardrail did to a request (serving.data.guardrails)
    """
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        creation_timestamp INTEGER NOT NULL
    );
    CREATE TABLE group_members (
        group_name TEXT NOT NULL REFERENCES groups (name) ON DELETE CASCADE,
        member TEXT NOT NULL,          -- a user name or a service principal's application id
        PRIMARY KEY (group_name, member)
    );
    CREATE INDEX group_members_by_member ON group_members (member);
    CREATE TABLE service_principals (
        application_id TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        display_name TEXT NOT NULL,
        active INTEGER NOT NULL DEFAULT 1,
        creation_timestamp INTEGER NOT NULL
    );
    ALTER TABLE usage ADD COLUMN guardrail TEXT;   -- e.g. input.pii BLOCK (email)
    """,
    # 9: the SQL function that sent a request (ai_query, ai_classify, ai_agg, ...; NULL for REST)
    """
    ALTER TABLE usage ADD COLUMN ai_function TEXT;
    """,
    # 10: the config generation: triggers count changes to what decides who may do what, so the
    # gateway's caches know when to read again (serving.control.generation)
    _generation_migration(),
    # 11: OpenAI-compatible batch jobs on sqlinfer serve (serving.data.batch_jobs)
    """
CREATE TABLE batch_files (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,         -- batch (uploaded) or batch_output (written by a job)
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE batch_jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, expired_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT,
    error_file_id TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    metadata_json TEXT,
    errors_json TEXT,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX batch_jobs_by_owner ON batch_jobs (owner, created_at);
CREATE TABLE batch_job_lines (
    batch_id TEXT NOT NULL REFERENCES batch_jobs(id) ON DELETE CASCADE,
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    request_json TEXT NOT NULL,
    outcome TEXT,                  -- NULL until answered; ok or error
    result_json TEXT,              -- the output-file line
    PRIMARY KEY (batch_id, line)
);
""",
]


_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.RLock:
    """One writer lock per database file per process, shared by every Database object on it."""
    key = str(path.resolve())
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.RLock())


def _statements(script: str) -> list[str]:
    """A migration's statements; a trigger's body keeps its own semicolons."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending)
            pending = ""
    return statements


class Database:
    """One SQLite file; a connection per thread; writes serialized by ``BEGIN IMMEDIATE``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._writer = _process_lock(self.path)
        self._key = str(self.path.resolve())  # what per-file state of this process is keyed by
        with self.write() as con:  # migrate under the write lock: two processes never race it
            version = con.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    con.execute(statement)
                con.execute(f"PRAGMA user_version = {number}")

    def _connection(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit is atomic and never corrupts; only a power cut (not a process
            # crash) can lose the last commits. FULL would fsync on every usage row.
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed if the block returns, rolled back if it raises.

        Threads of one process queue on a lock first. Left to SQLite, a thread that finds the
        write lock taken sleeps in the busy handler (1, 2, 5, 10 ... 100 ms): under 32 concurrent
        requests that sleeping, not work, capped the gateway at ~260 requests/s. Other processes
        still meet SQLite's lock and its busy timeout.
        """
        con = self._connection()
        with self._writer:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            from serving.control.generation import after_commit

            after_commit(self._key, con)

    def read(self) -> sqlite3.Connection:
        return self._connection()

    @property
    def schema_version(self) -> int:
        return self.read().execute("PRAGMA user_version").fetchone()[0]
