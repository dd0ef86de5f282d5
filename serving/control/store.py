"""The endpoint store: endpoints, their configs, history, tags and settings in SQLite. Persistence only.

Nothing here validates, deploys or decides who may do what (``validation``, ``deployer`` and
``service`` do); every method is one read or one transaction, so a refused request changes
nothing. :class:`ServingConfig` is what the data plane reads to answer a query, cached until the
database changes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.control.db import Database
from serving.errors import ResourceConflict, ResourceDoesNotExist

SYSTEM_PREFIX = "system-"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ServingConfig:
    """What the query path needs of an endpoint, as stored now.

    ``version`` changes with any change to the endpoint and with any change to secrets or their
    ACLs, so backends (which hold resolved provider keys) are rebuilt when limits, the config, a
    secret or a permission on one change; ``config`` includes internal fields and sealed secrets
    (never shown to anyone).
    """

    version: tuple[int, int, int]
    endpoint_id: str
    config: dict[str, Any]
    rate_limits: list[dict[str, Any]]
    log_payloads: bool  # ai_gateway.inference_table_config.enabled
    fallback: bool  # ai_gateway.fallback_config.enabled
    guardrails: dict[str, Any] | None = None  # ai_gateway.guardrails, as stored (serving.data.guardrails)

    @property
    def cache_version(self) -> str:
        """What stored answers of this endpoint are keyed by (the result store): with guardrails, they
        are part of it, so an answer stored before they changed is never served past them."""
        if not self.guardrails:
            return f"{self.endpoint_id}:{self.version[0]}"
        digest = hashlib.sha256(json.dumps(self.guardrails, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.endpoint_id}:{self.version[0]}:g{digest}"


class EndpointStore:
    def __init__(self, db: Database):
        self.db = db
        from serving.control.generation import GenerationCache

        self._serving_cache = GenerationCache(db.path)
        self._ids = GenerationCache(db.path)

    # -- reads -------------------------------------------------------------------------------

    def row(self, name: str):
        row = self.db.read().execute("SELECT * FROM endpoints WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise missing(name)
        return row

    def row_by_id(self, endpoint_id: str):
        row = self.db.read().execute("SELECT * FROM endpoints WHERE id = ?", (endpoint_id,)).fetchone()
        if row is None:
            raise ResourceDoesNotExist(f"no serving endpoint has id {endpoint_id!r}; the id is the 'id' field of "
                                       f"GET /api/2.0/serving-endpoints/<name>")
        return row

    def rows(self) -> list[Any]:
        return self.db.read().execute("SELECT * FROM endpoints ORDER BY name").fetchall()

    def names(self) -> list[str]:
        """Registered endpoint names (system endpoints excluded), without building their views."""
        return [row["name"] for row in self.db.read().execute("SELECT name FROM endpoints ORDER BY name")]

    def count(self) -> int:
        return self.db.read().execute("SELECT count(*) FROM endpoints").fetchone()[0]

    def tags(self, endpoint_id: str) -> list[dict[str, Any]]:
        rows = self.db.read().execute("SELECT key, value FROM endpoint_tags WHERE endpoint_id = ? ORDER BY key", (endpoint_id,))
        return [{"key": r["key"], "value": r["value"]} if r["value"] is not None else {"key": r["key"]} for r in rows]

    def in_progress(self) -> list[tuple[str, int]]:
        rows = self.db.read().execute("SELECT id, config_version FROM endpoints WHERE state_config_update = 'IN_PROGRESS'")
        return [(row["id"], row["config_version"]) for row in rows]

    def endpoint_id(self, name: str) -> str:
        """The id of ``name`` (cached until the config generation moves: every query asks)."""
        return self._ids.get(name, lambda: self.row(name)["id"])

    def serving(self, name: str) -> ServingConfig:
        """The config serving ``name`` now; cached until the config generation moves (every query asks)."""
        return self._serving_cache.get(name, lambda: self._load_serving(name))

    def _load_serving(self, name: str) -> ServingConfig:
        row = self.row(name)
        if row["config_json"] is None:
            raise ResourceConflict(f"endpoint {name!r} is not ready yet (state {row['state_ready']}); try again shortly")
        gateway = json.loads(row["ai_gateway_json"] or "{}")
        answer = ServingConfig(
            version=(row["config_version"] - (1 if row["pending_config_json"] else 0), row["last_updated_timestamp"],
                     self.db.read().execute("SELECT generation FROM secret_generation WHERE id = 1").fetchone()[0]),
            endpoint_id=row["id"],
            config=json.loads(row["config_json"]),
            rate_limits=json.loads(row["rate_limits_json"] or "[]") + (gateway.get("rate_limits") or []),
            log_payloads=bool((gateway.get("inference_table_config") or {}).get("enabled")),
            fallback=bool((gateway.get("fallback_config") or {}).get("enabled")),
            guardrails=gateway.get("guardrails") or None,
        )
        return answer

    # -- writes ------------------------------------------------------------------------------

    def insert(self, con, endpoint_id: str, name: str, creator: str, stored: dict[str, Any], route_optimized: bool,
               description: str | None, rate_limits: list[dict[str, Any]] | None, ai_gateway: dict[str, Any] | None,
               tags: list[tuple[str, str | None]], budget_policy_id: str | None = None) -> None:
        """A new endpoint whose first config is pending (inside the caller's transaction)."""
        now = now_ms()
        con.execute(
            "INSERT INTO endpoints (id, name, creator, creation_timestamp, last_updated_timestamp, state_ready, "
            "state_config_update, config_json, pending_config_json, config_version, route_optimized, description, "
            "rate_limits_json, ai_gateway_json, budget_policy_id) "
            "VALUES (?, ?, ?, ?, ?, 'NOT_READY', 'IN_PROGRESS', NULL, ?, 1, ?, ?, ?, ?, ?)",
            (endpoint_id, name, creator, now, now, json.dumps(stored), int(route_optimized), description,
             json.dumps(rate_limits) if rate_limits else None, json.dumps(ai_gateway) if ai_gateway else None,
             budget_policy_id),
        )
        con.execute("INSERT INTO endpoint_config_history VALUES (?, 1, ?, 'IN_PROGRESS', ?)", (endpoint_id, json.dumps(stored), now))
        for key, value in tags:
            con.execute("INSERT OR REPLACE INTO endpoint_tags VALUES (?, ?, ?)", (endpoint_id, key, value))

    def set_pending(self, con, endpoint_id: str, version: int, stored: dict[str, Any]) -> None:
        con.execute(
            "UPDATE endpoints SET pending_config_json = ?, config_version = ?, state_config_update = 'IN_PROGRESS', "
            "last_updated_timestamp = ? WHERE id = ?", (json.dumps(stored), version, now_ms(), endpoint_id))
        con.execute("INSERT INTO endpoint_config_history VALUES (?, ?, ?, 'IN_PROGRESS', ?)",
                    (endpoint_id, version, json.dumps(stored), now_ms()))

    def finish_deployment(self, endpoint_id: str, version: int, config: dict[str, Any], failed: bool) -> None:
        """The outcome of deploying ``version``; ignored if the endpoint moved on meanwhile."""
        with self.db.write() as con:
            current = con.execute("SELECT config_version FROM endpoints WHERE id = ?", (endpoint_id,)).fetchone()
            if current is None or current["config_version"] != version:
                return
            if failed:
                con.execute("UPDATE endpoints SET state_config_update = 'UPDATE_FAILED', pending_config_json = ?, "
                            "last_updated_timestamp = ? WHERE id = ?", (json.dumps(config), now_ms(), endpoint_id))
            else:
                con.execute("UPDATE endpoints SET config_json = ?, pending_config_json = NULL, state_ready = 'READY', "
                            "state_config_update = 'NOT_UPDATING', last_updated_timestamp = ? WHERE id = ?",
                            (json.dumps(config), now_ms(), endpoint_id))
            con.execute("UPDATE endpoint_config_history SET outcome = ?, config_json = ? WHERE endpoint_id = ? AND "
                        "config_version = ?", ("UPDATE_FAILED" if failed else "READY", json.dumps(config), endpoint_id, version))

    def pending(self, endpoint_id: str, version: int) -> dict[str, Any] | None:
        """The pending config of ``version``, or None if the endpoint was deleted or moved on."""
        row = self.db.read().execute("SELECT pending_config_json, config_version FROM endpoints WHERE id = ?",
                                     (endpoint_id,)).fetchone()
        if row is None or row["config_version"] != version or row["pending_config_json"] is None:
            return None
        return json.loads(row["pending_config_json"])

    def delete(self, endpoint_id: str) -> None:
        with self.db.write() as con:
            con.execute("DELETE FROM endpoints WHERE id = ?", (endpoint_id,))
            con.execute("DELETE FROM permissions WHERE endpoint_id = ?", (endpoint_id,))

    def patch_tags(self, endpoint_id: str, add: list[tuple[str, str | None]], delete: list[str]) -> None:
        with self.db.write() as con:
            for key in delete:
                con.execute("DELETE FROM endpoint_tags WHERE endpoint_id = ? AND key = ?", (endpoint_id, key))
            for key, value in add:
                con.execute("INSERT OR REPLACE INTO endpoint_tags VALUES (?, ?, ?)", (endpoint_id, key, value))
            con.execute("UPDATE endpoints SET last_updated_timestamp = ? WHERE id = ?", (now_ms(), endpoint_id))

    def set_column(self, endpoint_id: str, column: str, value: str) -> None:
        assert column in ("rate_limits_json", "ai_gateway_json")  # never a caller-chosen column
        with self.db.write() as con:
            con.execute(f"UPDATE endpoints SET {column} = ?, last_updated_timestamp = ? WHERE id = ?", (value, now_ms(), endpoint_id))

    # -- entity logs (the logs and build-logs routes) ----------------------------------------

    def log(self, endpoint_id: str, entity_name: str, kind: str, line: str) -> None:
        """One line of a served entity's build (deployment) or server (engine) log."""
        with self.db.write() as con:
            con.execute("INSERT INTO entity_logs VALUES (?, ?, ?, ?, ?)", (endpoint_id, entity_name, kind, now_ms(), line))
            # a log is for reading the recent past: keep its last 1,000 lines
            con.execute("DELETE FROM entity_logs WHERE rowid IN (SELECT rowid FROM entity_logs WHERE endpoint_id = ? AND "
                        "entity_name = ? AND kind = ? ORDER BY timestamp_ms DESC, rowid DESC LIMIT -1 OFFSET 1000)",
                        (endpoint_id, entity_name, kind))

    def logs(self, endpoint_id: str, entity_name: str, kind: str) -> str:
        import time as clock

        rows = self.db.read().execute("SELECT timestamp_ms, line FROM entity_logs WHERE endpoint_id = ? AND entity_name = ? "
                                      "AND kind = ? ORDER BY timestamp_ms, rowid", (endpoint_id, entity_name, kind))
        return "".join(f"{clock.strftime('%Y-%m-%dT%H:%M:%S', clock.gmtime(r['timestamp_ms'] / 1000))}."
                       f"{r['timestamp_ms'] % 1000:03d}Z {r['line']}\n" for r in rows)

    # -- local models (``sqlinfer models register``) -----------------------------------------

    def register_local_model(self, name: str, path: Path, task: str) -> None:
        with self.db.write() as con:
            con.execute("INSERT OR REPLACE INTO local_models VALUES (?, ?, ?, ?)", (name, str(path), task, now_ms()))

    def local_model(self, name: str) -> tuple[Path, str] | None:
        row = self.db.read().execute("SELECT path, task FROM local_models WHERE name = ?", (name,)).fetchone()
        return (Path(row["path"]), row["task"]) if row else None

    def local_model_names(self) -> list[str]:
        return [r["name"] for r in self.db.read().execute("SELECT name FROM local_models ORDER BY name")]


def missing(name: str) -> ResourceDoesNotExist:
    return ResourceDoesNotExist(f"endpoint {name!r} does not exist; list endpoints with GET /api/2.0/serving-endpoints")
