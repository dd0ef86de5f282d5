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
# Tokens per second one "chunk" of provisioned throughput buys for a local model. Measured on the
# project's 2-core CPU machine: SmolLM2-135M generates ~110 tok/s with batching (design.md).
LOCAL_THROUGHPUT_CHUNK = 100
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
        for field in ("min_provisioned_throughput", "max_provisioned_throughput"):
            value = getattr(entity, field)
            if value is not None and value % LOCAL_THROUGHPUT_CHUNK:
                raise InvalidParameterValue(
                    f"{where}.{field} = {value} must be a multiple of {LOCAL_THROUGHPUT_CHUNK}, the model's "
                    f"throughput_chunk_size (see GET .../get-model-optimization-info/{name}/{entity.entity_version or 1})")
        return task

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
