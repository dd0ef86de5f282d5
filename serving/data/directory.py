"""The endpoint directory: endpoint names -> backends (the data plane's name resolution).

"Directory", not "registry": the endpoint *store* (``serving.control``, SQLite) keeps what
endpoints are configured, MLflow's *model registry* keeps model versions, and this directory maps
a name to the backend that answers it in this process. Callers only ever ask
``directory.backend(name)``. Names registered in memory (the system
endpoints, test doubles) are answered directly; any other name goes to a resolver, which for
``directory_for(service)`` is the endpoint store (``serving.data.routing.StoredEndpointResolver``). The
bundled system models are pay-per-token style endpoints, the way Databricks pre-provisions its
``databricks-*`` endpoints:

* ``system-smollm2-135m-instruct`` (llm/v1/chat)
* ``system-all-minilm-l6-v2`` (llm/v1/embeddings)

Endpoints register by name; a duplicate is refused, and an unknown name is answered with the
list of known ones (the MLflow gateway's provider registry does the same).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from engine.errors import InvalidParameterValue, ResourceAlreadyExists, ResourceDoesNotExist, SqlinferError
from engine.types import TASKS, Task
from serving.data.backends import Backend, EchoBackend, LocalEngineBackend

SYSTEM_PREFIX = "system-"
BackendFactory = Callable[[], Backend]


@dataclass
class Endpoint:
    name: str
    task: Task
    factory: BackendFactory
    description: str = ""
    backend: Backend | None = None
    # What the result store keys answers by: changes whenever the model behind the name may have
    # (config version, endpoint recreated). None: never stored (test doubles registered in code).
    cache_version: str | None = None


class Resolver(Protocol):
    """Where names not registered in memory are looked up (the endpoint store)."""

    def names(self) -> list[str]: ...

    def lookup(self, name: str) -> tuple[object, Task, BackendFactory] | None: ...


class EndpointDirectory:
    """Thread-safe name -> endpoint map; backends are built on first use and then shared.

    Names registered in memory win; others go to the ``resolver``. A resolved endpoint is kept
    while its config version stays the same, so a config update brings a new backend.
    """

    def __init__(self, resolver: Resolver | None = None) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._resolved: dict[str, tuple[object, Endpoint]] = {}
        self._resolver = resolver
        self._lock = threading.Lock()

    def register(self, name: str, task: Task, backend: Backend | BackendFactory, description: str = "",
                 cache_version: str | None = None) -> None:
        if task not in TASKS:
            raise InvalidParameterValue(f"task {task!r} is not one of {', '.join(TASKS)}")
        factory = (lambda: backend) if isinstance(backend, Backend) else backend
        with self._lock:
            if name in self._endpoints:
                raise ResourceAlreadyExists(
                    f"endpoint {name!r} already exists; choose another name or remove it first"
                )
            self._endpoints[name] = Endpoint(name, task, factory, description, cache_version=cache_version)

    def is_registered(self, name: str) -> bool:
        """Whether ``name`` is registered in memory (the system endpoints, test doubles)."""
        with self._lock:
            return name in self._endpoints

    def forget(self, name: str) -> None:
        """Drop what was resolved for a stored endpoint (deleted or reconfigured): its backend lets
        go of what it holds now (a provisioned engine's cores), not at the next query."""
        with self._lock:
            cached = self._resolved.pop(name, None)
        if cached is not None and cached[1].backend is not None:
            cached[1].backend.release()

    def unregister(self, name: str) -> None:
        with self._lock:
            endpoint = self._endpoints.pop(name, None)
        if endpoint is None:
            raise self._not_found(name)
        if endpoint.backend is not None:
            endpoint.backend.close()

    def endpoint(self, name: str) -> Endpoint:
        with self._lock:
            endpoint = self._endpoints.get(name)
        if endpoint is not None:
            return endpoint
        found = self._resolver.lookup(name) if self._resolver is not None else None
        if found is None:
            self.forget(name)  # deleted elsewhere (the CLI, another process): let go of what it held
            raise self._not_found(name)
        version, task, factory, cache_version = found if len(found) == 4 else (*found, None)
        with self._lock:
            cached = self._resolved.get(name)
            if cached is not None and cached[0] == version:
                return cached[1]
            if cached is not None and cached[1].backend is not None:
                cached[1].backend.release()
            endpoint = Endpoint(name, task, factory, cache_version=cache_version)
            self._resolved[name] = (version, endpoint)
            return endpoint

    def backend(self, name: str) -> Backend:
        endpoint = self.endpoint(name)
        with self._lock:
            if endpoint.backend is None:
                endpoint.backend = endpoint.factory()
            return endpoint.backend

    def throughput(self, name: str) -> float | None:
        return getattr(self._resolver, "throughput", lambda n: None)(name)

    def rate_limits(self, name: str) -> list[dict[str, Any]]:
        """Rate limits of a registered endpoint (in-memory ones have none)."""
        with self._lock:
            if name in self._endpoints:
                return []
        return getattr(self._resolver, "rate_limits", lambda n: [])(name)

    def names(self) -> list[str]:
        with self._lock:
            names = set(self._endpoints)
        if self._resolver is not None:
            names.update(self._resolver.names())
        return sorted(names)

    def endpoints(self) -> list[Endpoint]:
        """Every endpoint; registered ones that are not ready yet are left out."""
        found = []
        for name in self.names():
            try:
                found.append(self.endpoint(name))
            except SqlinferError:
                continue
        return found

    def close(self) -> None:
        with self._lock:
            endpoints = list(self._endpoints.values()) + [e for _, e in self._resolved.values()]
        for endpoint in endpoints:
            if endpoint.backend is not None:
                endpoint.backend.close()

    def _not_found(self, name: str) -> ResourceDoesNotExist:
        known = ", ".join(self.names()) or "(none)"
        return ResourceDoesNotExist(
            f"endpoint {name!r} does not exist; known endpoints: {known}. "
            f"List them with `sqlinfer endpoints list`"
        )


ECHO_ENDPOINT = SYSTEM_PREFIX + "echo"
ECHO_EMBEDDINGS_ENDPOINT = SYSTEM_PREFIX + "echo-embeddings"


def add_system_endpoints(directory: EndpointDirectory, recorder=None) -> None:
    """Register one endpoint per bundled model, named ``system-<model>`` (usage recorded if given)."""
    from engine.model_store import BUNDLED_MODELS

    def factory(model) -> Backend:
        from serving.data.routing import TaggedBackend, scale_to_zero_seconds

        idle = scale_to_zero_seconds({"scale_to_zero_enabled": True})  # as their endpoint view says
        events = None
        if recorder is not None:
            from serving.control.store import EndpointStore

            store = EndpointStore(recorder.db)
            events = lambda line: store.log(SYSTEM_PREFIX + model.name, model.name, "server", line)  # noqa: E731
        backend: Backend = TaggedBackend(model.name, LocalEngineBackend(model.name, model.task, idle_timeout=idle, events=events))
        if recorder is not None:
            from serving.data.usage import UsageRecordingBackend

            name = SYSTEM_PREFIX + model.name
            backend = UsageRecordingBackend(backend, recorder, name, name)
        return backend

    # The built-in test backend (EchoBackend): instant answers, for trying the SQL machinery and
    # benchmarking its overhead without a model. Chat echoes the request; embeddings are 8 numbers.
    directory.register(ECHO_ENDPOINT, "llm/v1/chat", EchoBackend(), description="echoes the request (test backend)")
    directory.register(ECHO_EMBEDDINGS_ENDPOINT, "llm/v1/embeddings", EchoBackend("llm/v1/embeddings"),
                      description="8-number hash vectors (test backend)")
    for model in BUNDLED_MODELS.values():
        directory.register(
            SYSTEM_PREFIX + model.name,
            model.task,
            lambda model=model: factory(model),
            cache_version=f"bundled:{model.name}",
            description=f"bundled {model.name} ({model.license}) on the local engine",
        )


_DEFAULTS: dict[str, EndpointDirectory] = {}
_DEFAULT_LOCK = threading.Lock()


def directory_for(service) -> EndpointDirectory:
    """System endpoints in memory, everything else from ``service`` (an EndpointService)."""
    from serving.data.routing import StoredEndpointResolver

    from serving.data.usage import UsageRecorder

    directory = EndpointDirectory(StoredEndpointResolver(service))
    add_system_endpoints(directory, UsageRecorder(service.db))
    return directory


def default_directory() -> EndpointDirectory:
    """The process-wide directory: system endpoints and those in ``$SQLINFER_HOME/registry.db``."""
    from engine.model_store import sqlinfer_home

    home = str(sqlinfer_home())  # one per home: a process that changes SQLINFER_HOME gets that directory
    with _DEFAULT_LOCK:
        directory = _DEFAULTS.get(home)
        if directory is None:
            from serving.control.service import EndpointService

            directory = _DEFAULTS[home] = directory_for(EndpointService())
        return directory
