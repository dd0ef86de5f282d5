"""The endpoint registry: Databricks Model Serving semantics on SQLite.

What it keeps: endpoints with their served entities, traffic, config history, tags, rate limits,
AI-gateway settings and permissions (``serving.control.db``), secrets (``serving.control.secrets``), tokens and
permissions (``serving.control.auth``). What it decides:

* **Validation** happens once, when a request arrives: shapes and documented rules in
  ``serving.control.wire``; here, what needs a lookup — secret references exist, a local entity names a
  bundled model, a registered local model or a ``catalog.schema.model`` MLflow model with a
  version, provisioned throughput is a multiple of the model's ``throughput_chunk_size``, all
  entities serve one task, an update never switches external <-> non-external. A refused request
  changes nothing (every change is one transaction).
* **Deployment** runs in the background. A new config becomes ``pending_config`` with
  ``config_update: IN_PROGRESS`` while the old ``config`` keeps serving; each entity is checked
  (model files load, MLflow version exists, secrets still exist) and moves from
  ``DEPLOYMENT_CREATING`` to ``DEPLOYMENT_READY`` or ``DEPLOYMENT_FAILED``. All ready: the pending
  config replaces the old one (``NOT_UPDATING``). Any failed: ``UPDATE_FAILED``, the old config
  still serves and the failed pending config stays visible with the reasons. A second update
  while one is in progress is refused with ``RESOURCE_CONFLICT``. Deployments interrupted by a
  restart resume when the registry opens again.
* The bundled models appear as pre-provisioned ``system-*`` endpoints (like Databricks'
  ``databricks-*`` pay-per-token endpoints): listed, queryable by every user, never deletable.

Secrets never leave: ``*_plaintext`` values are sealed (encrypted) before they are stored and
omitted from every response; references stay references.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from engine.model_store import BUNDLED_MODELS, detect_task, sqlinfer_home
from engine.types import CUSTOM_TASK
from serving.control.auth import EMBEDDED, Auth, Principal
from serving.control.db import Database
from serving.errors import (
    InvalidParameterValue,
    PermissionDenied,
    ResourceAlreadyExists,
    ResourceConflict,
    ResourceDoesNotExist,
)
from serving.control.secrets import SecretStore
from serving.control.wire import (
    AccessControlList,
    AiGatewayConfig,
    CreateEndpoint,
    EndpointConfig,
    PatchTags,
    PutRateLimits,
    ServedEntity,
    parse,
)

log = logging.getLogger(__name__)

SYSTEM_PREFIX = "system-"
SYSTEM_CATALOG = "system.ai."
SEALED = "__sealed__"
# Tokens per second one "chunk" of provisioned throughput buys for a local model. Measured on the
# project's 2-core CPU machine: SmolLM2-135M generates ~110 tok/s with batching (design.md).
LOCAL_THROUGHPUT_CHUNK = 100


ENGINE_STATE_MESSAGES = {
    "SCALED_TO_ZERO": "Scaled to zero: the engine was unloaded while idle and starts again on the next request",
    "STARTING": "Starting: the engine is loading the model",
}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _public(value: Any) -> Any:
    """A stored config as clients see it: no sealed secrets, no internal ``_`` keys."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()
                if not k.startswith("_") and not (isinstance(v, dict) and SEALED in v)}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def _references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``{{secrets/...}}`` string inside a stored config, with its field path."""
    if isinstance(value, dict):
        return [ref for key, item in value.items() for ref in _references(item, f"{path}.{key}" if path else key)]
    if isinstance(value, str) and value.startswith("{{"):
        return [(path, value)]
    return []


class EndpointService:
    """The registry for one ``SQLINFER_HOME``; safe to use from several threads and processes."""

    def __init__(self, home: Path | None = None, deploy_gate: threading.Event | None = None):
        self.home = Path(home) if home else sqlinfer_home()
        self.db = Database(self.home / "registry.db")
        self.secrets = SecretStore(self.db, self.home)
        self.auth = Auth(self.db)
        # Tests hold deployments here to observe IN_PROGRESS; None deploys at once.
        self.deploy_gate = deploy_gate
        self._deployments: list[threading.Thread] = []
        self._serving_cache: dict[tuple[str, int], tuple[tuple[int, int, int], Any]] = {}
        self._resume_interrupted_deployments()

    # -- reads -------------------------------------------------------------------------------

    def list(self, principal: Principal = EMBEDDED) -> list[dict[str, Any]]:
        views = [self._system_view_now(name) for name in sorted(BUNDLED_MODELS)]
        rows = self.db.read().execute("SELECT * FROM endpoints ORDER BY name").fetchall()
        for row in rows:
            if self.auth.level(principal, row["id"]) is not None:
                views.append(self._view(row, principal))
        return views

    def names(self) -> list[str]:
        """Registered endpoint names (system endpoints excluded), without building their views."""
        return [row["name"] for row in self.db.read().execute("SELECT name FROM endpoints ORDER BY name")]

    def get(self, name: str, principal: Principal = EMBEDDED) -> dict[str, Any]:
        if self._is_system(name):
            return self._system_view_now(name[len(SYSTEM_PREFIX):])
        row = self._row(name)
        self.auth.require(principal, row["id"], name, "CAN_VIEW")
        return self._view(row, principal)

    def serving(self, name: str) -> tuple[tuple[int, int], str, dict[str, Any], list[dict[str, Any]], bool, bool]:
        """What the query path needs: (version key, endpoint id, config serving now, rate limits,
        whether payloads are logged to the inference table, whether fallback is on).

        The config includes internal fields and sealed secrets. The version key changes with any
        change to the endpoint, so backends are rebuilt when limits or config change. Answers are
        cached until the database changes (every query asks, several times).
        """
        token = self.db.change_token()
        cached = self._serving_cache.get((name, token[2]))
        if cached is not None and cached[0] == token:
            return cached[1]
        answer = self._serving_now(name)
        self._serving_cache[(name, token[2])] = (token, answer)
        return answer

    def _serving_now(self, name: str) -> tuple[tuple[int, int], str, dict[str, Any], list[dict[str, Any]], bool, bool]:
        row = self._row(name)
        if row["config_json"] is None:
            raise ResourceConflict(f"endpoint {name!r} is not ready yet (state {row['state_ready']}); try again shortly")
        gateway = json.loads(row["ai_gateway_json"] or "{}")
        limits = json.loads(row["rate_limits_json"] or "[]") + (gateway.get("rate_limits") or [])
        log_payloads = bool((gateway.get("inference_table_config") or {}).get("enabled"))
        key = (row["config_version"] - (1 if row["pending_config_json"] else 0), row["last_updated_timestamp"])
        fallback = bool((gateway.get("fallback_config") or {}).get("enabled"))
        return key, row["id"], json.loads(row["config_json"]), limits, log_payloads, fallback

    def endpoint_id(self, name: str) -> str:
        return name if self._is_system(name) else self._row(name)["id"]

    def local_model_path(self, entity_name: str) -> Path | None:
        """The directory of a bundled or registered local model named by ``entity_name``."""
        return self._local_model_path(entity_name)

    # -- writes ------------------------------------------------------------------------------

    def create(self, body: Any, principal: Principal = EMBEDDED) -> dict[str, Any]:
        request = parse(CreateEndpoint, body)
        if request.name.startswith(SYSTEM_PREFIX):
            raise InvalidParameterValue(
                f"endpoint name {request.name!r} is reserved: names starting with {SYSTEM_PREFIX!r} belong to the bundled models"
            )
        stored = self._prepare(request.config, principal)
        endpoint_id, now = uuid.uuid4().hex, _now_ms()
        with self.db.write() as con:
            if con.execute("SELECT 1 FROM endpoints WHERE name = ?", (request.name,)).fetchone():
                raise ResourceAlreadyExists(f"endpoint {request.name!r} already exists; choose another name or update its config")
            con.execute(
                "INSERT INTO endpoints (id, name, creator, creation_timestamp, last_updated_timestamp, state_ready, "
                "state_config_update, config_json, pending_config_json, config_version, route_optimized, description, "
                "rate_limits_json, ai_gateway_json) VALUES (?, ?, ?, ?, ?, 'NOT_READY', 'IN_PROGRESS', NULL, ?, 1, ?, ?, ?, ?)",
                (
                    endpoint_id, request.name, principal.user_name, now, now, json.dumps(stored),
                    int(bool(request.route_optimized)), request.description,
                    json.dumps([r.model_dump(exclude_none=True) for r in request.rate_limits]) if request.rate_limits else None,
                    request.ai_gateway.model_dump_json(exclude_none=True) if request.ai_gateway else None,
                ),
            )
            con.execute("INSERT INTO endpoint_config_history VALUES (?, 1, ?, 'IN_PROGRESS', ?)", (endpoint_id, json.dumps(stored), now))
            for tag in request.tags or []:
                con.execute("INSERT OR REPLACE INTO endpoint_tags VALUES (?, ?, ?)", (endpoint_id, tag.key, tag.value))
            self.auth.set_acl(con, endpoint_id, [(principal.user_name, "CAN_MANAGE")], replace=True)
        self._deploy_in_background(endpoint_id, 1)
        return self.get(request.name, principal)

    def update_config(self, name: str, body: Any, principal: Principal = EMBEDDED) -> dict[str, Any]:
        self._refuse_system(name, "update")
        config = parse(EndpointConfig, body)
        row = self._row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")
        stored = self._prepare(config, principal)
        with self.db.write() as con:
            row = con.execute("SELECT * FROM endpoints WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise self._missing(name)
            if row["state_config_update"] == "IN_PROGRESS":
                raise ResourceConflict(
                    f"endpoint {name!r} is already updating to config version {row['config_version']}; "
                    f"wait until state.config_update is no longer IN_PROGRESS"
                )
            previous = json.loads(row["config_json"] or row["pending_config_json"])
            was_external = any("external_model" in e for e in previous["served_entities"])
            if was_external != config.is_external:
                kinds = ("external", "non-external") if was_external else ("non-external", "external")
                raise InvalidParameterValue(
                    f"endpoint {name!r} serves {kinds[0]} models and cannot be switched to {kinds[1]} by an update; "
                    f"create a new endpoint instead"
                )
            version = row["config_version"] + 1
            con.execute(
                "UPDATE endpoints SET pending_config_json = ?, config_version = ?, state_config_update = 'IN_PROGRESS', "
                "last_updated_timestamp = ? WHERE id = ?",
                (json.dumps(stored), version, _now_ms(), row["id"]),
            )
            con.execute("INSERT INTO endpoint_config_history VALUES (?, ?, ?, 'IN_PROGRESS', ?)",
                        (row["id"], version, json.dumps(stored), _now_ms()))
        self._deploy_in_background(row["id"], version)
        return self.get(name, principal)

    def delete(self, name: str, principal: Principal = EMBEDDED) -> None:
        self._refuse_system(name, "delete")
        row = self._row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")
        with self.db.write() as con:
            con.execute("DELETE FROM endpoints WHERE id = ?", (row["id"],))
            con.execute("DELETE FROM permissions WHERE endpoint_id = ?", (row["id"],))

    def patch_tags(self, name: str, body: Any, principal: Principal = EMBEDDED) -> list[dict[str, Any]]:
        self._refuse_system(name, "tag")
        request = parse(PatchTags, body)
        row = self._row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")
        with self.db.write() as con:
            for key in request.delete_tags or []:
                con.execute("DELETE FROM endpoint_tags WHERE endpoint_id = ? AND key = ?", (row["id"], key))
            for tag in request.add_tags or []:
                con.execute("INSERT OR REPLACE INTO endpoint_tags VALUES (?, ?, ?)", (row["id"], tag.key, tag.value))
            con.execute("UPDATE endpoints SET last_updated_timestamp = ? WHERE id = ?", (_now_ms(), row["id"]))
        return self._tags(row["id"])

    def put_rate_limits(self, name: str, body: Any, principal: Principal = EMBEDDED) -> dict[str, Any]:
        self._refuse_system(name, "rate-limit")
        request = parse(PutRateLimits, body)
        for limit in request.rate_limits:
            if limit.calls is None or limit.tokens is not None or limit.key not in ("user", "endpoint"):
                raise InvalidParameterValue(
                    "the legacy rate-limits API takes {calls, key: user|endpoint, renewal_period: minute}; "
                    "use PUT .../ai-gateway for token limits and other keys"
                )
        limits = [r.model_dump(exclude_none=True) for r in request.rate_limits]
        self._set_column(name, principal, "rate_limits_json", json.dumps(limits))
        return {"rate_limits": limits}

    def put_ai_gateway(self, name: str, body: Any, principal: Principal = EMBEDDED) -> dict[str, Any]:
        self._refuse_system(name, "configure")
        gateway = parse(AiGatewayConfig, body)
        self._set_column(name, principal, "ai_gateway_json", gateway.model_dump_json(exclude_none=True))
        return gateway.model_dump(exclude_none=True)

    def register_local_model(self, name: str, path: str) -> dict[str, Any]:
        """Register a local Hugging Face directory as a model that ``entity_name`` can name."""
        directory = Path(path).expanduser().resolve()
        if not (directory / "config.json").exists():
            raise InvalidParameterValue(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
        if name in BUNDLED_MODELS or "." in name:
            raise InvalidParameterValue(f"model name {name!r} is taken by a bundled model or contains '.'; choose another")
        task = detect_task(directory)
        with self.db.write() as con:
            con.execute("INSERT OR REPLACE INTO local_models VALUES (?, ?, ?, ?)", (name, str(directory), task, _now_ms()))
        return {"name": name, "path": str(directory), "task": task}

    # -- permissions -------------------------------------------------------------------------

    def permissions(self, endpoint_id: str, principal: Principal = EMBEDDED) -> dict[str, Any]:
        row = self._row_by_id(endpoint_id)
        self.auth.require(principal, endpoint_id, row["name"], "CAN_VIEW")
        return self._acl_view(endpoint_id)

    def set_permissions(self, endpoint_id: str, body: Any, replace: bool, principal: Principal = EMBEDDED) -> dict[str, Any]:
        request = parse(AccessControlList, body)
        row = self._row_by_id(endpoint_id)
        self.auth.require(principal, endpoint_id, row["name"], "CAN_MANAGE")
        entries = [(e.user_name, e.permission_level) for e in request.access_control_list]
        with self.db.write() as con:
            self.auth.set_acl(con, endpoint_id, entries, replace=replace)
        return self._acl_view(endpoint_id)

    def _acl_view(self, endpoint_id: str) -> dict[str, Any]:
        return {
            "object_id": f"/serving-endpoints/{endpoint_id}",
            "object_type": "serving-endpoint",
            "access_control_list": [
                {"user_name": user, "all_permissions": [{"permission_level": level, "inherited": False}]}
                for user, level in self.auth.acl(endpoint_id)
            ],
        }

    # -- model optimization info -------------------------------------------------------------

    def optimization_info(self, model: str, version: str) -> dict[str, Any]:
        path = self._local_model_path(model)
        if path is None:
            raise ResourceDoesNotExist(
                f"model {model!r} version {version!r} is not a bundled or registered local model; "
                f"register one with `sqlinfer models register NAME PATH`"
            )
        config = json.loads((path / "config.json").read_text())
        return {"optimizable": True, "model_type": config.get("model_type", "unknown"),
                "throughput_chunk_size": LOCAL_THROUGHPUT_CHUNK}

    # -- internals: validation that needs lookups --------------------------------------------

    def _prepare(self, config: EndpointConfig, principal: Principal) -> dict[str, Any]:
        """Check what needs the registry and turn the config into its stored form."""
        tasks = set()
        stored_entities = []
        for index, entity in enumerate(config.served_entities):
            where = f"config.served_entities[{index}]"
            if entity.external_model is not None:
                self._check_external_secrets(entity, where)
                tasks.add(entity.external_model.task)
            else:
                task = self._check_local(entity, where)
                if task is not None:
                    tasks.add(task)
            for key, value in (entity.environment_vars or {}).items():
                if value.startswith("{{"):
                    self.secrets.check_reference(value, f"{where}.environment_vars.{key}")
            stored = self._seal(entity.model_dump(exclude_none=True))
            stored.update(state={"deployment": "DEPLOYMENT_CREATING", "deployment_state_message": ""},
                          creator=principal.user_name, creation_timestamp=_now_ms())
            stored_entities.append(stored)
        if len(tasks) > 1:
            raise InvalidParameterValue(f"all served entities of an endpoint must serve one task, got {', '.join(sorted(tasks))}")
        return {
            "served_entities": stored_entities,
            "traffic_config": config.traffic_config.model_dump(exclude_none=True),
            "_task": tasks.pop() if tasks else None,
        }

    def _check_external_secrets(self, entity: ServedEntity, where: str) -> None:
        external = entity.external_model
        for config_name in ("openai_config", "anthropic_config", "custom_provider_config"):
            provider_config = getattr(external, config_name)
            if provider_config is None:
                continue
            values = provider_config.model_dump(exclude_none=True)
            if "bearer_token_auth" in values:
                values = values["bearer_token_auth"]
                config_name += ".bearer_token_auth"
            for field, value in values.items():
                if isinstance(value, str) and value.startswith("{{"):
                    self.secrets.check_reference(value, f"{where}.external_model.{config_name}.{field}")

    def _check_local(self, entity: ServedEntity, where: str) -> str | None:
        """The task of a local entity (None for MLflow models: known once deployed)."""
        name = entity.entity_name or ""
        bundled = name[len(SYSTEM_CATALOG):] if name.startswith(SYSTEM_CATALOG) else name
        if bundled in BUNDLED_MODELS:
            task = BUNDLED_MODELS[bundled].task
        else:
            row = self.db.read().execute("SELECT task FROM local_models WHERE name = ?", (name,)).fetchone()
            if row is not None:
                task = row["task"]
            elif name.count(".") == 2:
                if not entity.entity_version:
                    raise InvalidParameterValue(f"{where}.entity_version is required for the registered model {name!r}")
                task = None
            else:
                registered = [r["name"] for r in self.db.read().execute("SELECT name FROM local_models ORDER BY name")]
                raise ResourceDoesNotExist(
                    f"{where}.entity_name {name!r} is not a bundled model ({', '.join(sorted(BUNDLED_MODELS))}), "
                    f"a registered local model ({', '.join(registered) or 'none'}), or an MLflow model named "
                    f"catalog.schema.model"
                )
        for field in ("min_provisioned_throughput", "max_provisioned_throughput"):
            value = getattr(entity, field)
            if value is not None and value % LOCAL_THROUGHPUT_CHUNK:
                raise InvalidParameterValue(
                    f"{where}.{field} = {value} must be a multiple of {LOCAL_THROUGHPUT_CHUNK}, the model's "
                    f"throughput_chunk_size (see GET .../get-model-optimization-info/{name}/{entity.entity_version or 1})"
                )
        return task

    def _seal(self, value: Any) -> Any:
        if isinstance(value, SecretStr):
            return {SEALED: self.secrets.seal(value.get_secret_value())}
        if isinstance(value, dict):
            return {k: self._seal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._seal(v) for v in value]
        return value

    def _local_model_path(self, name: str) -> Path | None:
        bundled = name[len(SYSTEM_CATALOG):] if name.startswith(SYSTEM_CATALOG) else name
        if bundled in BUNDLED_MODELS:
            from engine.model_store import resolve_model

            return resolve_model(bundled).path
        row = self.db.read().execute("SELECT path FROM local_models WHERE name = ?", (name,)).fetchone()
        return Path(row["path"]) if row else None

    # -- internals: deployment ---------------------------------------------------------------

    def _deploy_in_background(self, endpoint_id: str, version: int) -> None:
        thread = threading.Thread(target=self._deploy, args=(endpoint_id, version), name=f"deploy-{endpoint_id[:8]}", daemon=True)
        self._deployments.append(thread)
        thread.start()

    def wait_for_deployments(self, timeout: float = 120) -> None:
        """Block until every background deployment started by this process has finished."""
        deadline = time.monotonic() + timeout
        for thread in list(self._deployments):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _deploy(self, endpoint_id: str, version: int) -> None:
        if self.deploy_gate is not None:
            self.deploy_gate.wait()
        row = self.db.read().execute("SELECT pending_config_json, config_version FROM endpoints WHERE id = ?", (endpoint_id,)).fetchone()
        if row is None or row["config_version"] != version or row["pending_config_json"] is None:
            return  # deleted or superseded meanwhile
        config = json.loads(row["pending_config_json"])
        failed = False
        for entity in config["served_entities"]:
            try:
                task = self._check_deployable(entity)
                if task and config.get("_task") and task != config["_task"]:
                    raise InvalidParameterValue(
                        f"served entity {entity['name']!r} serves {task} but the endpoint serves {config['_task']}; "
                        f"all served entities of an endpoint must serve one task"
                    )
                if task and not config.get("_task"):
                    config["_task"] = task
                entity["state"] = {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""}
            except Exception as exc:  # every failure becomes the entity's state, never a crash
                failed = True
                message = exc.message if hasattr(exc, "message") else f"{type(exc).__name__}: {exc}"
                entity["state"] = {"deployment": "DEPLOYMENT_FAILED", "deployment_state_message": message}
        with self.db.write() as con:
            current = con.execute("SELECT config_version, config_json FROM endpoints WHERE id = ?", (endpoint_id,)).fetchone()
            if current is None or current["config_version"] != version:
                return
            if failed:
                con.execute(
                    "UPDATE endpoints SET state_config_update = 'UPDATE_FAILED', pending_config_json = ?, "
                    "last_updated_timestamp = ? WHERE id = ?",
                    (json.dumps(config), _now_ms(), endpoint_id),
                )
            else:
                con.execute(
                    "UPDATE endpoints SET config_json = ?, pending_config_json = NULL, state_ready = 'READY', "
                    "state_config_update = 'NOT_UPDATING', last_updated_timestamp = ? WHERE id = ?",
                    (json.dumps(config), _now_ms(), endpoint_id),
                )
            con.execute(
                "UPDATE endpoint_config_history SET outcome = ?, config_json = ? WHERE endpoint_id = ? AND config_version = ?",
                ("UPDATE_FAILED" if failed else "READY", json.dumps(config), endpoint_id, version),
            )

    def _check_deployable(self, entity: dict[str, Any]) -> str | None:
        """Raise if the entity cannot serve; return its task when only deployment can tell it."""
        if "external_model" in entity:
            # Secrets may have been deleted since the request was accepted.
            for field, reference in _references(entity["external_model"]):
                self.secrets.check_reference(reference, f"served entity {entity['name']!r} {field}")
            return None
        name = entity["entity_name"]
        path = self._local_model_path(name)
        if path is not None:
            config = json.loads((path / "config.json").read_text())  # a broken directory fails here
            if not isinstance(config, dict) or "model_type" not in config and "architectures" not in config:
                raise InvalidParameterValue(f"{str(path / 'config.json')!r} is not a model config")
            return detect_task(path)
        from serving.control.mlflow_models import prepare_model_version

        prepared = prepare_model_version(name, entity.get("entity_version"), self.home)
        entity["_local_path"] = prepared["path"]  # the copied model: an engine directory or a pyfunc model
        return prepared["task"]

    def _resume_interrupted_deployments(self) -> None:
        rows = self.db.read().execute(
            "SELECT id, config_version FROM endpoints WHERE state_config_update = 'IN_PROGRESS'"
        ).fetchall()
        for row in rows:
            self._deploy_in_background(row["id"], row["config_version"])

    # -- internals: views --------------------------------------------------------------------

    def _view(self, row, principal: Principal) -> dict[str, Any]:
        view: dict[str, Any] = {
            "name": row["name"],
            "creator": row["creator"],
            "creation_timestamp": row["creation_timestamp"],
            "last_updated_timestamp": row["last_updated_timestamp"],
            "state": {"ready": row["state_ready"], "config_update": row["state_config_update"]},
        }
        serving_version = row["config_version"] - (1 if row["pending_config_json"] else 0)
        if row["config_json"]:
            config = json.loads(row["config_json"])
            view["config"] = _public(config) | {"config_version": serving_version}
            self._show_engine_states(config, view["config"])
            if config.get("_task") and config["_task"] != CUSTOM_TASK:  # Databricks shows no task for custom models
                view["task"] = config["_task"]
        if row["pending_config_json"]:
            pending = json.loads(row["pending_config_json"])
            view["pending_config"] = _public(pending) | {
                "config_version": row["config_version"], "start_time": row["last_updated_timestamp"]}
            view.setdefault("task", pending.get("_task"))
        if view.get("task") in (None, CUSTOM_TASK):
            view.pop("task", None)
        view["tags"] = self._tags(row["id"])
        if row["rate_limits_json"]:
            view["rate_limits"] = json.loads(row["rate_limits_json"])
        if row["ai_gateway_json"]:
            view["ai_gateway"] = json.loads(row["ai_gateway_json"])
        if row["description"]:
            view["description"] = row["description"]
        view["id"] = row["id"]
        view["permission_level"] = self.auth.level(principal, row["id"]) or "CAN_VIEW"
        view["route_optimized"] = bool(row["route_optimized"])
        return view

    def _show_engine_states(self, config: dict[str, Any], shown: dict[str, Any]) -> None:
        """Local entities whose engine this process has scaled to zero (or is starting) say so."""
        engine_module = sys.modules.get("engine.vllm_engine")  # no engine was ever loaded otherwise
        states = engine_module.engine_states() if engine_module else {}
        if not states:
            return
        for stored, entity in zip(config["served_entities"], shown["served_entities"]):
            if "external_model" in stored or config.get("_task") == CUSTOM_TASK:
                continue
            path = stored.get("_local_path") or self._local_model_path(stored["entity_name"])
            state = states.get(str(path)) if path else None
            if state in ENGINE_STATE_MESSAGES:
                entity["state"] = dict(entity.get("state") or {}, deployment_state_message=ENGINE_STATE_MESSAGES[state])

    def _system_view_now(self, model_name: str) -> dict[str, Any]:
        view = self._system_view(model_name)
        stored = {"served_entities": [{"entity_name": model_name}], "_task": view["task"]}
        self._show_engine_states(stored, view["config"])
        return view

    @staticmethod
    def _system_view(model_name: str) -> dict[str, Any]:
        model = BUNDLED_MODELS.get(model_name)
        if model is None:
            raise ResourceDoesNotExist(
                f"endpoint {SYSTEM_PREFIX + model_name!r} does not exist; system endpoints: "
                f"{', '.join(SYSTEM_PREFIX + n for n in sorted(BUNDLED_MODELS))}"
            )
        ready = {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""}
        return {
            "name": SYSTEM_PREFIX + model.name,
            "creator": "system",
            "creation_timestamp": 0,
            "last_updated_timestamp": 0,
            "state": {"ready": "READY", "config_update": "NOT_UPDATING"},
            "config": {
                "served_entities": [{"name": model.name, "entity_name": SYSTEM_CATALOG + model.name,
                                     "entity_version": "1", "scale_to_zero_enabled": True, "state": ready}],
                "traffic_config": {"routes": [{"served_model_name": model.name, "traffic_percentage": 100}]},
                "config_version": 1,
            },
            "task": model.task,
            "endpoint_type": "FOUNDATION_MODEL_API",
            "tags": [{"key": "source", "value": f"bundled {model.package} ({model.license})"}],
            "id": SYSTEM_PREFIX + model.name,
            "permission_level": "CAN_QUERY",
            "route_optimized": False,
        }

    def _tags(self, endpoint_id: str) -> list[dict[str, Any]]:
        rows = self.db.read().execute("SELECT key, value FROM endpoint_tags WHERE endpoint_id = ? ORDER BY key", (endpoint_id,))
        return [{"key": r["key"], "value": r["value"]} if r["value"] is not None else {"key": r["key"]} for r in rows]

    def _set_column(self, name: str, principal: Principal, column: str, value: str) -> None:
        row = self._row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")
        with self.db.write() as con:
            con.execute(f"UPDATE endpoints SET {column} = ?, last_updated_timestamp = ? WHERE id = ?", (value, _now_ms(), row["id"]))

    def _row(self, name: str):
        row = self.db.read().execute("SELECT * FROM endpoints WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise self._missing(name)
        return row

    def _row_by_id(self, endpoint_id: str):
        row = self.db.read().execute("SELECT * FROM endpoints WHERE id = ?", (endpoint_id,)).fetchone()
        if row is None:
            if endpoint_id.startswith(SYSTEM_PREFIX):
                raise PermissionDenied(f"permissions of the system endpoint {endpoint_id!r} are fixed: every user may query it")
            raise ResourceDoesNotExist(f"no serving endpoint has id {endpoint_id!r}; the id is the 'id' field of GET /api/2.0/serving-endpoints/<name>")
        return row

    def _missing(self, name: str) -> ResourceDoesNotExist:
        return ResourceDoesNotExist(f"endpoint {name!r} does not exist; list endpoints with GET /api/2.0/serving-endpoints")

    @staticmethod
    def _is_system(name: str) -> bool:
        return name.startswith(SYSTEM_PREFIX)

    def _refuse_system(self, name: str, action: str) -> None:
        if self._is_system(name):
            self._system_view(name[len(SYSTEM_PREFIX):])  # unknown system name: 404 listing the real ones
            raise InvalidParameterValue(
                f"cannot {action} {name!r}: system endpoints are provisioned by sqlinfer for the bundled models; "
                f"create your own endpoint with entity_name {SYSTEM_CATALOG + name[len(SYSTEM_PREFIX):]!r}"
            )

