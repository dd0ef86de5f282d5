"""Deployment: a pending config becomes the serving one in the background, entity by entity.

A new config is ``pending_config`` with ``config_update: IN_PROGRESS`` while the old config keeps
serving. Each entity is checked (model files load, the MLflow version exists and is copied, the
secrets it references still exist and its author may still read them) and moves from
``DEPLOYMENT_CREATING`` to ``DEPLOYMENT_READY`` or ``DEPLOYMENT_FAILED``. All ready: the pending
config replaces the old one. Any failed: ``UPDATE_FAILED``, the old config still serves.

Threads start only when asked: :meth:`Deployer.deploy` for a new config, :meth:`resume` for
deployments a restart interrupted (the server and the CLI call it; constructing the service
starts nothing).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from engine.model_store import detect_task
from serving.control.auth import Auth
from serving.control.secrets import SecretStore
from serving.control.store import EndpointStore
from serving.control.validation import ConfigValidator, references
from serving.errors import InvalidParameterValue


def provisioned_units(entity: dict[str, Any]) -> int | None:
    units = entity.get("provisioned_model_units")
    return int(units) if units else None


class Deployer:
    def __init__(self, store: EndpointStore, secrets: SecretStore, auth: Auth, validator: ConfigValidator, home: Path,
                 gate: threading.Event | None = None):
        self.store, self.secrets, self.auth, self.validator, self.home = store, secrets, auth, validator, home
        self.gate = gate  # tests hold deployments here to observe IN_PROGRESS; None deploys at once
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def deploy(self, endpoint_id: str, version: int) -> None:
        thread = threading.Thread(target=self._deploy, args=(endpoint_id, version), name=f"deploy-{endpoint_id[:8]}",
                                  daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def resume(self) -> None:
        """Deploy again what a restart interrupted (state IN_PROGRESS in the store)."""
        for endpoint_id, version in self.store.in_progress():
            self.deploy(endpoint_id, version)

    def wait(self, timeout: float = 120) -> None:
        """Block until every deployment started by this process has finished."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _deploy(self, endpoint_id: str, version: int) -> None:
        if self.gate is not None:
            self.gate.wait()
        config = self.store.pending(endpoint_id, version)
        if config is None:
            return  # deleted or superseded meanwhile
        failed = False
        for entity in config["served_entities"]:
            def log(line: str, entity=entity) -> None:
                self.store.log(endpoint_id, entity["name"], "build", line)

            log(f"deploying config version {version}: served entity {entity['name']!r}")
            try:
                task = self._check_deployable(entity, config.get("_author"), log)
                if task and config.get("_task") and task != config["_task"]:
                    raise InvalidParameterValue(
                        f"served entity {entity['name']!r} serves {task} but the endpoint serves {config['_task']}; "
                        f"all served entities of an endpoint must serve one task")
                if task and not config.get("_task"):
                    config["_task"] = task
                entity["state"] = {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""}
                log(f"DEPLOYMENT_READY ({task or config.get('_task') or 'task known at first use'})")
            except Exception as exc:  # every failure becomes the entity's state, never a crash
                failed = True
                message = exc.message if hasattr(exc, "message") else f"{type(exc).__name__}: {exc}"
                entity["state"] = {"deployment": "DEPLOYMENT_FAILED", "deployment_state_message": message}
                log(f"DEPLOYMENT_FAILED: {message}")
        self.store.finish_deployment(endpoint_id, version, config, failed)

    def _provision(self, entity: dict[str, Any], name: str, path: Path, task: str, log) -> None:
        """Model units from the request and this machine's measured chunk; recorded in the entity
        for the data plane (its own engine on that many cores, admitted at that rate)."""
        from engine import reservations, throughput

        if task not in ("llm/v1/chat", "llm/v1/completions"):
            raise InvalidParameterValue(f"served entity {entity['name']!r}: provisioned throughput is measured for chat "
                                        f"and completions models; {name!r} serves {task}, serve it without it")
        log(f"measuring the throughput of one model unit (one CPU core) for {name!r} on this machine (once; cached)")
        measured = throughput.measure(str(path))
        chunk = measured.chunk_size
        log(f"throughput_chunk_size {chunk} tokens/s per model unit ({measured.tokens_per_second} measured on one core "
            f"of {measured.cpu_model}, {measured.dtype})")
        units = provisioned_units(entity)
        if units is None:
            for field in ("min_provisioned_throughput", "max_provisioned_throughput"):
                value = entity.get(field)
                if value and value % chunk:
                    raise InvalidParameterValue(
                        f"served entity {entity['name']!r} {field} = {value} must be a multiple of {chunk}, the model's "
                        f"throughput_chunk_size on this machine (GET .../get-model-optimization-info/{name}/1)")
            units = entity["max_provisioned_throughput"] // chunk
        cores = reservations.machine_cores()
        if units > len(cores) - 1:
            raise InvalidParameterValue(
                f"served entity {entity['name']!r} needs {units} model unit(s), one CPU core each; this machine has "
                f"{len(cores)} core(s) and keeps one for pay-per-token traffic, so at most {max(len(cores) - 1, 0)}")
        entity["_provisioned_units"] = units
        entity["_provisioned_tokens_per_second"] = units * chunk
        log(f"provisioned {units} model unit(s): {units * chunk} tokens/s on {units} reserved core(s); the entity's own "
            f"engine starts on the first request")

    def _check_deployable(self, entity: dict[str, Any], author: str | None, log) -> str | None:
        """Raise if the entity cannot serve; return its task when only deployment can tell it."""
        # Secrets may have been deleted, or their author's READ revoked, since the request. (Configs
        # stored before authors were recorded name their entity's creator.)
        author_principal = self.auth.principal_named(author or entity.get("creator") or "")
        for field, reference in references(entity):
            self.secrets.check_reference(reference, f"served entity {entity['name']!r} {field}", author_principal)
            log(f"{field}: secret reference {reference} readable by {author_principal.user_name!r}")
        if "external_model" in entity:
            external = entity["external_model"]
            log(f"external model {external['name']!r} at provider {external['provider']!r}, task {external['task']}")
            return None
        name = entity["entity_name"]
        path = self.validator.local_model_path(name)
        if path is not None:
            config = json.loads((path / "config.json").read_text())  # a broken directory fails here
            if not isinstance(config, dict) or "model_type" not in config and "architectures" not in config:
                raise InvalidParameterValue(f"{str(path / 'config.json')!r} is not a model config")
            task = detect_task(path)
            if provisioned_units(entity) is not None or entity.get("max_provisioned_throughput"):
                self._provision(entity, name, path, task, log)
                return task
            log(f"model {name!r}: {config.get('model_type', 'unknown type')} files at {path}, serves {task}; its engine "
                f"starts on the first request")
            return task
        from serving.control.mlflow_models import prepare_model_version

        log(f"MLflow model {name!r} version {entity.get('entity_version')}: copying its artifacts")
        prepared = prepare_model_version(name, entity.get("entity_version"), self.home)
        entity["_local_path"] = prepared["path"]  # the copied model: an engine directory or a pyfunc model
        log(f"copied to {prepared['path']}; serves {prepared['task']}")
        if provisioned_units(entity) is not None or entity.get("max_provisioned_throughput"):
            self._provision(entity, name, Path(prepared["path"]), prepared["task"], log)
        return prepared["task"]
