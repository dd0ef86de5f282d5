"""Endpoints as clients see them: Databricks' JSON shapes, with nothing internal or secret in them.

A stored config holds sealed ``*_plaintext`` values and internal ``_`` keys (task, author, copied
model paths); :func:`public` removes both. System endpoints (the bundled models) have fixed views.
Local entities whose engine this process scaled to zero, or is starting, say so in their state.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from engine.model_store import BUNDLED_MODELS
from engine.types import CUSTOM_TASK
from serving.control.auth import Auth, Principal
from serving.control.principals import GROUP_PREFIX
from serving.control.secrets import SEALED
from serving.control.store import SYSTEM_PREFIX, EndpointStore
from serving.control.validation import SYSTEM_CATALOG, ConfigValidator
from serving.errors import ResourceDoesNotExist

ENGINE_STATE_MESSAGES = {
    "SCALED_TO_ZERO": "Scaled to zero: the engine was unloaded while idle and starts again on the next request",
    "STARTING": "Starting: the engine is loading the model",
}


def public(value: Any) -> Any:
    """A stored config as clients see it: no sealed secrets, no internal ``_`` keys."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()
                if not k.startswith("_") and not (isinstance(v, dict) and SEALED in v)}
    if isinstance(value, list):
        return [public(v) for v in value]
    return value


class EndpointViews:
    def __init__(self, store: EndpointStore, auth: Auth, validator: ConfigValidator):
        self.store, self.auth, self.validator = store, auth, validator

    def endpoint(self, row, principal: Principal) -> dict[str, Any]:
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
            view["config"] = public(config) | {"config_version": serving_version}
            self._show_engine_states(config, view["config"])
            if config.get("_task") and config["_task"] != CUSTOM_TASK:  # Databricks shows no task for custom models
                view["task"] = config["_task"]
        if row["pending_config_json"]:
            pending = json.loads(row["pending_config_json"])
            view["pending_config"] = public(pending) | {
                "config_version": row["config_version"], "start_time": row["last_updated_timestamp"]}
            view.setdefault("task", pending.get("_task"))
        if view.get("task") in (None, CUSTOM_TASK):
            view.pop("task", None)
        view["tags"] = self.store.tags(row["id"])
        if row["rate_limits_json"]:
            view["rate_limits"] = json.loads(row["rate_limits_json"])
        if row["ai_gateway_json"]:
            view["ai_gateway"] = json.loads(row["ai_gateway_json"])
        if row["description"]:
            view["description"] = row["description"]
        if row["budget_policy_id"]:
            view["budget_policy_id"] = row["budget_policy_id"]
        view["id"] = row["id"]
        view["permission_level"] = self.auth.level(principal, row["id"]) or "CAN_VIEW"
        view["route_optimized"] = bool(row["route_optimized"])
        return view

    def system(self, model_name: str) -> dict[str, Any]:
        view = system_view(model_name)
        stored = {"served_entities": [{"entity_name": model_name}], "_task": view["task"]}
        self._show_engine_states(stored, view["config"])
        return view

    def acl(self, endpoint_id: str) -> dict[str, Any]:
        return {
            "object_id": f"/serving-endpoints/{endpoint_id}",
            "object_type": "serving-endpoint",
            "access_control_list": [
                {self._acl_field(name): name.removeprefix(GROUP_PREFIX),
                 "all_permissions": [{"permission_level": level, "inherited": False}]}
                for name, level in self.auth.acl(endpoint_id)
            ],
        }

    def _acl_field(self, name: str) -> str:
        if name.startswith(GROUP_PREFIX):
            return "group_name"
        return "service_principal_name" if self.auth.principals.is_service_principal(name) else "user_name"

    def _show_engine_states(self, config: dict[str, Any], shown: dict[str, Any]) -> None:
        engine_module = sys.modules.get("engine.vllm_engine")  # no engine was ever loaded otherwise
        states = engine_module.engine_states() if engine_module else {}
        if not states:
            return
        for stored, entity in zip(config["served_entities"], shown["served_entities"]):
            if "external_model" in stored or config.get("_task") == CUSTOM_TASK:
                continue
            path = stored.get("_local_path") or self.validator.local_model_path(stored["entity_name"])
            state = states.get(str(path)) if path else None
            if state in ENGINE_STATE_MESSAGES:
                entity["state"] = dict(entity.get("state") or {}, deployment_state_message=ENGINE_STATE_MESSAGES[state])


def system_view(model_name: str) -> dict[str, Any]:
    """The fixed view of ``system-<model_name>``; unknown names list the real ones."""
    model = BUNDLED_MODELS.get(model_name)
    if model is None:
        raise ResourceDoesNotExist(
            f"endpoint {SYSTEM_PREFIX + model_name!r} does not exist; system endpoints: "
            f"{', '.join(SYSTEM_PREFIX + n for n in sorted(BUNDLED_MODELS))}")
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
