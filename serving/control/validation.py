"""Validation that needs lookups, and the stored form of a config.

``serving.control.wire`` checks shapes and the documented rules between fields; this module checks
what only the store can tell, with the rights of the principal making the change:

* every ``{{secrets/scope/key}}`` reference (provider keys, bearer tokens, ``environment_vars``)
  names a scope its author may READ and a key that exists, so a config can never make the server
  send someone else's secret anywhere;
* external base URLs are inside the egress allow-list (``serving.control.egress``);
* a local entity names a bundled model, a registered local model or an MLflow model
  ``catalog.schema.model`` with a version; provisioned throughput is a multiple of the model's
  chunk size; all entities serve one task.

The stored form seals ``*_plaintext`` values and records the author (``_author``), whose rights
are checked again when the config is deployed and whenever a secret is resolved for a call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr

from engine.model_store import BUNDLED_MODELS
from serving.control.auth import Principal
from serving.control.egress import check_url
from serving.control.secrets import SEALED, SecretStore
from serving.control.store import EndpointStore, now_ms
from serving.control.wire import EndpointConfig, ServedEntity
from serving.errors import InvalidParameterValue, ResourceDoesNotExist

SYSTEM_CATALOG = "system.ai."
PROVIDER_URL_FIELDS = {"openai_config": ("openai_api_base",), "custom_provider_config": ("custom_provider_url",)}


def references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every ``{{secrets/...}}`` string inside a config (stored or as sent), with its field path."""
    if isinstance(value, dict):
        return [ref for key, item in value.items() if not str(key).startswith("_")
                for ref in references(item, f"{path}.{key}" if path else str(key))]
    if isinstance(value, str) and value.startswith("{{"):
        return [(path, value)]
    return []


def provider_urls(external: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, URL) of every base URL an external model sends requests to."""
    found = []
    for config_name, fields in PROVIDER_URL_FIELDS.items():
        for field in fields:
            url = (external.get(config_name) or {}).get(field)
            if url:
                found.append((f"{config_name}.{field}", url))
    if external.get("provider") == "openai" and not (external.get("openai_config") or {}).get("openai_api_base"):
        found.append(("openai_config.openai_api_base (default)", "https://api.openai.com/v1"))
    return found


class ConfigValidator:
    def __init__(self, store: EndpointStore, secrets: SecretStore):
        self.store, self.secrets = store, secrets

    def prepare(self, config: EndpointConfig, principal: Principal) -> dict[str, Any]:
        """Check what needs the store, as ``principal``, and return the config's stored form."""
        tasks = set()
        stored_entities = []
        for index, entity in enumerate(config.served_entities):
            where = f"config.served_entities[{index}]"
            raw = entity.model_dump(exclude_none=True, mode="python")
            for field, reference in references(raw):
                self.secrets.check_reference(reference, f"{where}.{field}", principal)
            if entity.external_model is not None:
                for field, url in provider_urls(raw["external_model"]):
                    check_url(url, f"{where}.external_model.{field}")
                tasks.add(entity.external_model.task)
            else:
                task = self._check_local(entity, where)
                if task is not None:
                    tasks.add(task)
            stored = self._seal(raw)
            stored.update(state={"deployment": "DEPLOYMENT_CREATING", "deployment_state_message": ""},
                          creator=principal.user_name, creation_timestamp=now_ms())
            stored_entities.append(stored)
        if len(tasks) > 1:
            raise InvalidParameterValue(f"all served entities of an endpoint must serve one task, got {', '.join(sorted(tasks))}")
        return {
            "served_entities": stored_entities,
            "traffic_config": config.traffic_config.model_dump(exclude_none=True),
            "_task": tasks.pop() if tasks else None,
            "_author": principal.user_name,
        }

    def _check_local(self, entity: ServedEntity, where: str) -> str | None:
        """The task of a local entity (None for MLflow models: known once deployed)."""
        name = entity.entity_name or ""
        bundled = name[len(SYSTEM_CATALOG):] if name.startswith(SYSTEM_CATALOG) else name
        if bundled in BUNDLED_MODELS:
            task = BUNDLED_MODELS[bundled].task
        else:
            local = self.store.local_model(name)
            if local is not None:
                task = local[1]
            elif name.count(".") == 2:
                if not entity.entity_version:
                    raise InvalidParameterValue(f"{where}.entity_version is required for the registered model {name!r}")
                task = None
            else:
                raise ResourceDoesNotExist(
                    f"{where}.entity_name {name!r} is not a bundled model ({', '.join(sorted(BUNDLED_MODELS))}), "
                    f"a registered local model ({', '.join(self.store.local_model_names()) or 'none'}), or an MLflow "
                    f"model named catalog.schema.model")
        measured = self._measured_chunk(name) if entity.max_provisioned_throughput else None
        for field in ("min_provisioned_throughput", "max_provisioned_throughput"):
            value = getattr(entity, field)
            # Checked here when this machine's chunk is known already; else when the deployment measures it.
            if measured and value and value % measured:
                raise InvalidParameterValue(
                    f"{where}.{field} = {value} must be a multiple of {measured}, the model's throughput_chunk_size "
                    f"on this machine (see GET .../get-model-optimization-info/{name}/{entity.entity_version or 1})")
        return task

    def _measured_chunk(self, name: str) -> int | None:
        from engine import throughput

        path = self.local_model_path(name)
        found = throughput.cached(str(path)) if path is not None else None
        return found.chunk_size if found else None

    def _seal(self, value: Any) -> Any:
        if isinstance(value, SecretStr):
            return {SEALED: self.secrets.seal(value.get_secret_value())}
        if isinstance(value, dict):
            return {k: self._seal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._seal(v) for v in value]
        return value

    def local_model_path(self, name: str) -> Path | None:
        """The directory of a bundled or registered local model named by ``entity_name``."""
        bundled = name[len(SYSTEM_CATALOG):] if name.startswith(SYSTEM_CATALOG) else name
        if bundled in BUNDLED_MODELS:
            from engine.model_store import resolve_model

            return resolve_model(bundled).path
        local = self.store.local_model(name)
        return local[0] if local else None


# -- fields sqlinfer refuses by name rather than accepting and ignoring --------------------------

def _gpu_visible() -> bool:
    import os

    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")


def check_supported_config(config: EndpointConfig, endpoint_name: str, where: str = "config") -> None:
    """Refuse what a served-entity config asks for that sqlinfer would otherwise silently not do."""
    from serving.errors import NotImplementedFeature

    if config.name is not None and config.name != endpoint_name:
        raise InvalidParameterValue(f"{where}.name = {config.name!r} must be the endpoint's name {endpoint_name!r} "
                                    f"(or left out)")
    refused: list[str] = []
    if config.served_models is not None:
        refused.append(f"{where}.served_models (the legacy form): send served_entities with entity_name/entity_version")
    if config.auto_capture_config is not None:
        refused.append(f"{where}.auto_capture_config (legacy inference tables): use ai_gateway.inference_table_config, "
                       f"which sqlinfer implements")
    for index, entity in enumerate(config.served_entities or []):
        at = f"{where}.served_entities[{index}]"
        if entity.environment_vars:
            refused.append(f"{at}.environment_vars: sqlinfer's engines are shared per model and run in the server "
                           f"process, so per-entity environment variables cannot be applied; remove them")
        if entity.instance_profile_arn:
            refused.append(f"{at}.instance_profile_arn: AWS instance profiles do not exist here; remove it")
        if entity.min_provisioned_concurrency is not None or entity.max_provisioned_concurrency is not None:
            refused.append(f"{at}.min/max_provisioned_concurrency: sqlinfer does not reserve concurrency; use "
                           f"scale_to_zero_enabled and rate limits")
        if entity.workload_type and entity.workload_type.startswith(("GPU", "MULTIGPU")) and not _gpu_visible():
            raise InvalidParameterValue(f"{at}.workload_type = {entity.workload_type!r} needs a GPU, and this server has "
                                        f"none (see `sqlinfer doctor`); use CPU or leave it out")
    if refused:
        raise NotImplementedFeature("not implemented by sqlinfer, refused rather than ignored: " + "; ".join(refused))


def check_supported_gateway(gateway: Any, where: str = "ai_gateway") -> None:
    """Guardrails and rate limits by group or service principal arrive with groups and service
    principals; until then they are refused, not stored as if they worked."""
    from serving.errors import NotImplementedFeature

    refused = []
    if gateway is None:
        return
    for direction in ("input", "output"):  # pii and invalid_keywords are enforced (serving.data.guardrails)
        params = getattr(gateway.guardrails, direction, None) if gateway.guardrails is not None else None
        if params is not None and params.safety:
            refused.append(f"{where}.guardrails.{direction}.safety: the safety filter needs a safety model, which "
                           f"sqlinfer does not have; remove it (pii and invalid_keywords are enforced)")
        if params is not None and params.valid_topics:
            refused.append(f"{where}.guardrails.{direction}.valid_topics: topic moderation needs a safety model, which "
                           f"sqlinfer does not have; remove it (pii and invalid_keywords are enforced)")
    if refused:
        raise NotImplementedFeature("not implemented by sqlinfer, refused rather than ignored: " + "; ".join(refused))


def check_supported_create(request: Any) -> None:
    from serving.errors import NotImplementedFeature

    refused = []
    if request.route_optimized:
        refused.append("route_optimized: route-optimized endpoints are queried with OAuth data-plane tokens, which "
                       "sqlinfer does not issue; leave it false (every endpoint is queried at /serving-endpoints/<name>)")
    if request.telemetry_config is not None:
        refused.append("telemetry_config: use ai_gateway.usage_tracking_config and inference_table_config")
    notifications = request.email_notifications
    if notifications is not None and (notifications.on_update_failure or notifications.on_update_success):
        refused.append("email_notifications: sqlinfer sends no e-mail; watch state.config_update instead")
    if refused:
        raise NotImplementedFeature("not implemented by sqlinfer, refused rather than ignored: " + "; ".join(refused))
    check_supported_config(request.config, request.name)
    check_supported_gateway(request.ai_gateway)
