"""The endpoint service: Databricks Model Serving semantics, composed from the control plane's parts.

It is the one place the REST edge and the CLI call to read or change endpoints, and it decides
who may do what: creating needs the ``create-serving-endpoints`` entitlement, viewing CAN_VIEW,
changing CAN_MANAGE. The parts each do one job:

* ``store`` (SQLite persistence, one transaction per change: a refused request changes nothing),
* ``validation`` (checks that need lookups, as the principal making the change: secret
  references only to scopes they may READ, egress allow-list, local models, one task),
* ``deployer`` (pending configs deploy in background threads, started explicitly),
* ``views`` (the JSON clients see: no sealed secret, no internal field),
* ``secrets`` and ``auth`` (scope ACLs, tokens, permissions, entitlements).

The bundled models appear as pre-provisioned ``system-*`` endpoints (like Databricks'
``databricks-*`` pay-per-token endpoints): listed, queryable by every user, never changed.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

from engine.model_store import BUNDLED_MODELS, detect_task, sqlinfer_home
from engine.types import CUSTOM_TASK
from serving.control.auth import CREATE_ENDPOINTS, EMBEDDED, Auth, Principal
from serving.control.db import Database
from serving.control.principals import GROUP_PREFIX
from serving.control.deployer import Deployer
from serving.control.secrets import SEALED, SecretStore  # noqa: F401  (SEALED: the data plane unseals values)
from serving.control.store import SYSTEM_PREFIX, EndpointStore, ServingConfig, missing
from serving.control.validation import (
    SYSTEM_CATALOG,
    ConfigValidator,
    check_supported_config,
    check_supported_create,
    check_supported_gateway,
)
from serving.control.views import EndpointViews, system_view
from serving.control.wire import (
    AccessControlList,
    AiGatewayConfig,
    CreateEndpoint,
    EndpointConfig,
    PatchTags,
    PutRateLimits,
    parse,
)
from serving.errors import InvalidParameterValue, PermissionDenied, ResourceAlreadyExists, ResourceConflict, ResourceDoesNotExist


def _parsed(model: type, body: Any) -> Any:
    """A request already validated by the REST edge, or a raw JSON value (the CLI) to validate."""
    return body if isinstance(body, model) else parse(model, body)


class EndpointService:
    """The control plane for one ``SQLINFER_HOME``; safe to use from several threads and processes.

    Constructing it starts nothing; :meth:`start` resumes deployments a restart interrupted.
    """

    def __init__(self, home: Path | None = None, deploy_gate: threading.Event | None = None):
        self.home = Path(home) if home else sqlinfer_home()
        self.db = Database(self.home / "registry.db")
        self.store = EndpointStore(self.db)
        self.secrets = SecretStore(self.db, self.home)
        self.auth = Auth(self.db)
        self.validator = ConfigValidator(self.store, self.secrets)
        self.deployer = Deployer(self.store, self.secrets, self.auth, self.validator, self.home, deploy_gate)
        self.views = EndpointViews(self.store, self.auth, self.validator)

    def start(self) -> "EndpointService":
        self.deployer.resume()
        return self

    def wait_for_deployments(self, timeout: float = 120) -> None:
        self.deployer.wait(timeout)

    # -- reads -------------------------------------------------------------------------------

    def list(self, principal: Principal = EMBEDDED) -> list[dict[str, Any]]:
        views = [self.views.system(name) for name in sorted(BUNDLED_MODELS)]
        for row in self.store.rows():
            if self.auth.level(principal, row["id"]) is not None:
                views.append(self.views.endpoint(row, principal))
        return views

    def names(self) -> list[str]:
        return self.store.names()

    def get(self, name: str, principal: Principal = EMBEDDED) -> dict[str, Any]:
        if name.startswith(SYSTEM_PREFIX):
            return self.views.system(name[len(SYSTEM_PREFIX):])
        row = self.store.row(name)
        self.auth.require(principal, row["id"], name, "CAN_VIEW")
        return self.views.endpoint(row, principal)

    def serving(self, name: str) -> ServingConfig:
        return self.store.serving(name)

    def endpoint_id(self, name: str) -> str:
        return name if name.startswith(SYSTEM_PREFIX) else self.store.endpoint_id(name)

    def local_model_path(self, entity_name: str) -> Path | None:
        return self.validator.local_model_path(entity_name)

    # -- writes ------------------------------------------------------------------------------

    def create(self, body: Any, principal: Principal = EMBEDDED) -> dict[str, Any]:
        self.auth.require_entitlement(principal, CREATE_ENDPOINTS, "create serving endpoints")
        request = _parsed(CreateEndpoint, body)
        check_supported_create(request)
        self._check_limit_principals(request.ai_gateway)
        _check_legacy_limits(request.rate_limits or [])
        if request.name.startswith(SYSTEM_PREFIX):
            raise InvalidParameterValue(
                f"endpoint name {request.name!r} is reserved: names starting with {SYSTEM_PREFIX!r} belong to the bundled models")
        stored = self.validator.prepare(request.config, principal)
        endpoint_id = uuid.uuid4().hex
        with self.db.write() as con:
            if con.execute("SELECT 1 FROM endpoints WHERE name = ?", (request.name,)).fetchone():
                raise ResourceAlreadyExists(f"endpoint {request.name!r} already exists; choose another name or update its config")
            self.store.insert(
                con, endpoint_id, request.name, principal.user_name, stored, bool(request.route_optimized),
                request.description,
                [r.model_dump(exclude_none=True) for r in request.rate_limits] if request.rate_limits else None,
                request.ai_gateway.model_dump(exclude_none=True) if request.ai_gateway else None,
                [(tag.key, tag.value) for tag in request.tags or []], request.budget_policy_id)
            self.auth.set_acl(con, endpoint_id, [(principal.user_name, "CAN_MANAGE")], replace=True)
        self.deployer.deploy(endpoint_id, 1)
        return self.get(request.name, principal)

    def update_config(self, name: str, body: Any, principal: Principal = EMBEDDED) -> dict[str, Any]:
        self._refuse_system(name, "update")
        row = self.store.row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")
        # A new config makes the server call out anew (URLs, keys): the same entitlement as creating.
        self.auth.require_entitlement(principal, CREATE_ENDPOINTS, "change the config of serving endpoints")
        config = _parsed(EndpointConfig, body)
        check_supported_config(config, name)
        # Every secret reference is checked again with the updater's rights: a manager who may not
        # read a scope can neither keep its secret nor send it to a new URL.
        stored = self.validator.prepare(config, principal)
        with self.db.write() as con:
            row = con.execute("SELECT * FROM endpoints WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise missing(name)
            if row["state_config_update"] == "IN_PROGRESS":
                raise ResourceConflict(
                    f"endpoint {name!r} is already updating to config version {row['config_version']}; "
                    f"wait until state.config_update is no longer IN_PROGRESS")
            previous = json.loads(row["config_json"] or row["pending_config_json"])
            was_external = any("external_model" in e for e in previous["served_entities"])
            if was_external != config.is_external:
                kinds = ("external", "non-external") if was_external else ("non-external", "external")
                raise InvalidParameterValue(
                    f"endpoint {name!r} serves {kinds[0]} models and cannot be switched to {kinds[1]} by an update; "
                    f"create a new endpoint instead")
            version = row["config_version"] + 1
            self.store.set_pending(con, row["id"], version, stored)
        self.deployer.deploy(row["id"], version)
        return self.get(name, principal)

    def delete(self, name: str, principal: Principal = EMBEDDED) -> None:
        self._refuse_system(name, "delete")
        row = self.store.row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")
        self.store.delete(row["id"])

    def patch_tags(self, name: str, body: Any, principal: Principal = EMBEDDED) -> list[dict[str, Any]]:
        self._refuse_system(name, "tag")
        request = _parsed(PatchTags, body)
        row = self.store.row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")
        self.store.patch_tags(row["id"], [(t.key, t.value) for t in request.add_tags or []], request.delete_tags or [])
        return self.store.tags(row["id"])

    def put_rate_limits(self, name: str, body: Any, principal: Principal = EMBEDDED) -> dict[str, Any]:
        self._refuse_system(name, "rate-limit")
        request = _parsed(PutRateLimits, body)
        _check_legacy_limits(request.rate_limits)
        limits = [r.model_dump(exclude_none=True) for r in request.rate_limits]
        self._set_column(name, principal, "rate_limits_json", limits)
        return {"rate_limits": limits}

    def put_ai_gateway(self, name: str, body: Any, principal: Principal = EMBEDDED) -> dict[str, Any]:
        self._refuse_system(name, "configure")
        row = self.store.row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")  # before anything tells what it serves
        gateway = _parsed(AiGatewayConfig, body)
        check_supported_gateway(gateway)
        self._check_limit_principals(gateway)
        self._check_guardrails_can_act(name, gateway)
        self._set_column(name, principal, "ai_gateway_json", gateway.model_dump(exclude_none=True))
        return gateway.model_dump(exclude_none=True)

    def register_local_model(self, name: str, path: str) -> dict[str, Any]:
        """Register a local Hugging Face directory as a model that ``entity_name`` can name."""
        directory = Path(path).expanduser().resolve()
        if not (directory / "config.json").exists():
            raise InvalidParameterValue(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
        if name in BUNDLED_MODELS or "." in name:
            raise InvalidParameterValue(f"model name {name!r} is taken by a bundled model or contains '.'; choose another")
        task = detect_task(directory)
        self.store.register_local_model(name, directory, task)
        return {"name": name, "path": str(directory), "task": task}

    def entity_logs(self, name: str, entity_name: str, kind: str, principal: Principal = EMBEDDED) -> str:
        """A served entity's build log (deployment steps) or server log (engine starts, failures)."""
        view = self.get(name, principal)  # CAN_VIEW, and a 404 for an unknown endpoint
        entities = [e["name"] for config in (view.get("config"), view.get("pending_config")) if config
                    for e in config["served_entities"]]
        if entity_name not in entities:
            raise ResourceDoesNotExist(f"endpoint {name!r} has no served entity {entity_name!r}; its entities: "
                                       f"{', '.join(dict.fromkeys(entities))}")
        return self.store.logs(view["id"], entity_name, kind)

    # -- permissions -------------------------------------------------------------------------

    def permission_levels(self, endpoint_id: str, principal: Principal = EMBEDDED) -> dict[str, Any]:
        row = self._row_by_id(endpoint_id)
        self.auth.require(principal, endpoint_id, row["name"], "CAN_VIEW")
        described = {"CAN_VIEW": "Can view the endpoint, its config, logs and metrics",
                     "CAN_QUERY": "Can view and query the endpoint",
                     "CAN_MANAGE": "Can view, query, update, delete and manage permissions of the endpoint"}
        return {"permission_levels": [{"permission_level": level, "description": text} for level, text in described.items()]}

    def permissions(self, endpoint_id: str, principal: Principal = EMBEDDED) -> dict[str, Any]:
        row = self._row_by_id(endpoint_id)
        self.auth.require(principal, endpoint_id, row["name"], "CAN_VIEW")
        return self.views.acl(endpoint_id)

    def set_permissions(self, endpoint_id: str, body: Any, replace: bool, principal: Principal = EMBEDDED) -> dict[str, Any]:
        request = _parsed(AccessControlList, body)
        row = self._row_by_id(endpoint_id)
        self.auth.require(principal, endpoint_id, row["name"], "CAN_MANAGE")
        entries = [(self._acl_principal(e), e.permission_level) for e in request.access_control_list]
        with self.db.write() as con:
            self.auth.set_acl(con, endpoint_id, entries, replace=replace)
        return self.views.acl(endpoint_id)

    def _check_guardrails_can_act(self, name: str, gateway: Any) -> None:
        """Guardrails read text: refused where there is none to read, rather than accepted and idle."""
        if gateway.guardrails is None:
            return
        task = json.loads(self.store.row(name)["config_json"] or "{}").get("_task")
        if task == CUSTOM_TASK:
            raise InvalidParameterValue(f"ai_gateway.guardrails: {name!r} serves a custom model, whose rows are not text; "
                                        f"guardrails act on chat, completions and embeddings endpoints")
        if task == "llm/v1/embeddings" and gateway.guardrails.output is not None:
            raise InvalidParameterValue(f"ai_gateway.guardrails.output: {name!r} answers embeddings, which hold no text "
                                        f"to check; keep the input guardrails only")

    def _check_limit_principals(self, gateway: Any) -> None:
        """A limit for a group or service principal that does not exist would hold for nobody."""
        for index, limit in enumerate((gateway.rate_limits if gateway else None) or []):
            if limit.key == "user_group" and not self.auth.principals.exists(limit.principal):
                raise InvalidParameterValue(f"ai_gateway.rate_limits[{index}].principal: {limit.principal!r} is not a "
                                            f"group; create it first (`sqlinfer groups create {limit.principal}`)")
            if limit.key == "service_principal" and not self.auth.principals.is_service_principal(limit.principal):
                raise InvalidParameterValue(f"ai_gateway.rate_limits[{index}].principal: {limit.principal!r} is not a "
                                            f"service principal's application_id; list them with GET "
                                            f"/api/2.0/preview/scim/v2/ServicePrincipals")

    def _acl_principal(self, entry: Any) -> str:
        """How an ACL entry's principal is stored: users and service principals by name, groups
        as ``group:NAME``; a group or service principal must exist (a typo would grant nothing)."""
        principals = self.auth.principals
        if entry.group_name is not None:
            if not principals.exists(entry.group_name):
                raise InvalidParameterValue(f"group_name {entry.group_name!r} is not a group; create it first "
                                            f"(`sqlinfer groups create {entry.group_name}`)")
            return GROUP_PREFIX + entry.group_name
        if entry.service_principal_name is not None:
            if not principals.is_service_principal(entry.service_principal_name):
                raise InvalidParameterValue(f"service_principal_name {entry.service_principal_name!r} is not a service "
                                            f"principal's application_id; list them with GET "
                                            f"/api/2.0/preview/scim/v2/ServicePrincipals")
            return entry.service_principal_name
        return entry.user_name

    # -- model optimization info -------------------------------------------------------------

    def optimization_info(self, model: str, version: str, principal: Principal = EMBEDDED) -> dict[str, Any]:
        path = self.validator.local_model_path(model)
        if path is None:
            raise ResourceDoesNotExist(
                f"model {model!r} version {version!r} is not a bundled or registered local model; "
                f"register one with `sqlinfer models register NAME PATH`")
        config = json.loads((path / "config.json").read_text())
        if detect_task(path) not in ("llm/v1/chat", "llm/v1/completions"):
            return {"optimizable": False, "model_type": config.get("model_type", "unknown")}
        from engine import reservations, throughput  # measured once on this machine (about a minute), then cached

        measured = throughput.cached(str(path))
        if measured is None:
            # Measuring runs a one-core engine for about a minute: for those who may provision.
            self.auth.require_entitlement(principal, CREATE_ENDPOINTS, f"measure {model!r}'s throughput on this machine "
                                                                       f"(it is not measured yet)")
            measured = throughput.measure(str(path))
        return {"optimizable": True, "model_type": config.get("model_type", "unknown"),
                "throughput_chunk_size": measured.chunk_size,
                "measurement": {"tokens_per_second_per_model_unit": measured.tokens_per_second,
                                "model_unit": "one CPU core running the model's own engine",
                                "cpu_model": measured.cpu_model, "dtype": measured.dtype,
                                "machine_cores": len(reservations.machine_cores())}}

    # -- internals ---------------------------------------------------------------------------

    def _set_column(self, name: str, principal: Principal, column: str, value: Any) -> None:
        row = self.store.row(name)
        self.auth.require(principal, row["id"], name, "CAN_MANAGE")
        self.store.set_column(row["id"], column, json.dumps(value))

    def _row_by_id(self, endpoint_id: str):
        if endpoint_id.startswith(SYSTEM_PREFIX):
            raise PermissionDenied(f"permissions of the system endpoint {endpoint_id!r} are fixed: every user may query it")
        return self.store.row_by_id(endpoint_id)

    def _refuse_system(self, name: str, action: str) -> None:
        if name.startswith(SYSTEM_PREFIX):
            system_view(name[len(SYSTEM_PREFIX):])  # unknown system name: 404 listing the real ones
            raise InvalidParameterValue(
                f"cannot {action} {name!r}: system endpoints are provisioned by sqlinfer for the bundled models; "
                f"create your own endpoint with entity_name {SYSTEM_CATALOG + name[len(SYSTEM_PREFIX):]!r}")


def _check_legacy_limits(limits: list[Any]) -> None:
    """The legacy ``rate_limits`` (on create and PUT .../rate-limits) keep Databricks' old form."""
    for index, limit in enumerate(limits):
        if limit.calls is None or limit.tokens is not None or limit.key not in ("user", "endpoint") or limit.principal:
            raise InvalidParameterValue(
                f"rate_limits[{index}]: the legacy rate limits take {{calls, key: user|endpoint, renewal_period: "
                f"minute}}; use ai_gateway.rate_limits for token limits, principals and other keys")
