"""From a registered endpoint to one backend: served entities built, traffic split honoured.

The registry (``serving.control.service``) stores what an endpoint serves; this module turns the
config serving *now* into a :class:`Backend` the SQL functions and the REST API call:

* each served entity becomes a backend (local entities: the in-process vLLM engine on the
  model's directory; engines are shared per directory, so two endpoints on one model share it);
* an endpoint with several entities becomes a :class:`TrafficSplitBackend`, which assigns every
  request of a batch to an entity at random with the ``traffic_config`` weights, calls each
  entity once with its share, and merges the answers back in input order, each tagged with the
  entity that answered (``served_entity``, the REST ``served-model-name`` header).

:class:`StoredEndpointResolver` lets the in-memory :class:`~serving.data.directory.EndpointDirectory` find
registered endpoints by name; a config update changes the version and so the backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from typing import Any, Callable, Sequence

from engine.errors import InvalidParameterValue
from engine.prefix_reuse import PrefixReuse
from engine.types import CUSTOM_TASK, EmbeddingResult, GenerationResult, PredictionResult, Task
from serving.data.backends import Backend, DelegatingBackend, LocalEngineBackend, ResultCallback, async_like_inner
from serving.control.service import SEALED, SYSTEM_PREFIX, EndpointService
from serving.errors import ResourceDoesNotExist, SqlinferError
from serving.data.limits import RateLimitedBackend, RateLimiter, limits_from
from serving.data.provisioned import DedicatedEngineBackend, ProvisionedBackend, Provisioning
from serving.data.usage import UsageRecorder, UsageRecordingBackend


# Requests in flight at once per external served entity (SQLINFER_PROVIDER_CONCURRENCY).
PROVIDER_CONCURRENCY = int(os.environ.get("SQLINFER_PROVIDER_CONCURRENCY", "16"))


class TrafficSplitBackend(Backend):
    """Several served entities behind one endpoint, chosen per request by traffic percentage."""

    def __init__(self, task: Task, routes: Sequence[tuple[str, int, Backend]], rng: random.Random | None = None):
        self.task = task
        self.routes = [(name, weight, backend) for name, weight, backend in routes if weight > 0]
        self._rng = rng or random.Random()

    @property
    def native_async(self) -> bool:
        return all(backend.native_async for _, _, backend in self.routes)

    def _shares(self, count: int) -> list[tuple[str, Backend, list[int]]]:
        """Which positions of a batch each entity answers, drawn with the traffic weights."""
        choices = self._rng.choices(range(len(self.routes)), weights=[w for _, w, _ in self.routes], k=count)
        shares = []
        for route_index, (entity, _, backend) in enumerate(self.routes):
            positions = [i for i, chosen in enumerate(choices) if chosen == route_index]
            if positions:
                shares.append((entity, backend, positions))
        return shares

    async def _afan_out(self, call: Callable[[Backend, list[Any]], Any], items: Sequence[Any]) -> list[Any]:
        shares = self._shares(len(items))
        answers = await asyncio.gather(*(call(backend, [items[i] for i in positions]) for _, backend, positions in shares))
        results: list[Any] = [None] * len(items)
        for (entity, _, positions), answered in zip(shares, answers):
            for position, answer in zip(positions, answered):
                results[position] = dataclasses.replace(answer, served_entity=entity)
        return results

    async def achat(self, conversations, options):
        return await self._afan_out(lambda b, part: b.achat(part, options), conversations)

    async def acomplete(self, prompts, options):
        return await self._afan_out(lambda b, part: b.acomplete(part, options), prompts)

    async def aembed(self, texts):
        return await self._afan_out(lambda b, part: b.aembed(part), texts)

    def _fan_out(self, call: Callable[[Backend, list[Any], ResultCallback | None], list[Any]],
                 items: Sequence[Any], on_result: ResultCallback | None) -> list[Any]:
        results: list[Any] = [None] * len(items)
        for entity, backend, positions in self._shares(len(items)):

            def tagged(local_index: int, result: Any, positions=positions, entity=entity) -> None:
                if on_result is not None:
                    on_result(positions[local_index], dataclasses.replace(result, served_entity=entity))

            answers = call(backend, [items[i] for i in positions], tagged if on_result else None)
            for position, answer in zip(positions, answers):
                results[position] = dataclasses.replace(answer, served_entity=entity)
        return results

    def chat(self, conversations, options, on_result=None):
        return self._fan_out(lambda b, part, cb: b.chat(part, options, cb), conversations, on_result)

    def complete(self, prompts, options, on_result=None):
        return self._fan_out(lambda b, part, cb: b.complete(part, options, cb), prompts, on_result)

    def embed(self, texts, on_result=None):
        return self._fan_out(lambda b, part, cb: b.embed(part, cb), texts, on_result)

    def stream(self, request, options, chat):
        [route] = self._rng.choices(self.routes, weights=[w for _, w, _ in self.routes], k=1)
        for delta in route[2].stream(request, options, chat):
            yield dataclasses.replace(delta, served_entity=route[0])

    def predict(self, rows, params=None, on_result=None):
        return self._fan_out(lambda b, part, cb: b.predict(part, params, cb), rows, on_result)

    def embedding_dimension(self) -> int | None:
        return self.routes[0][2].embedding_dimension() if self.routes else None

    def count_tokens(self, requests, kind):
        return self.routes[0][2].count_tokens(requests, kind) if self.routes else None

    def prefix_reuse(self, requests, kind):
        if len(self.routes) != 1:  # the rows are split between entities: each engine sees a part
            return PrefixReuse(unknown_because="the endpoint splits its traffic between served entities")
        return self.routes[0][2].prefix_reuse(requests, kind)

    def warm_up(self) -> None:
        for _, _, backend in self.routes:
            backend.warm_up()

    def close(self) -> None:
        for _, _, backend in self.routes:
            backend.close()

    def release(self) -> None:
        for _, _, backend in self.routes:
            backend.release()


def entity_backend(service: EndpointService, entity: dict[str, Any], task: Task, author: str | None = None,
                   endpoint_id: str | None = None) -> Backend:
    """The backend for one stored served entity; ``author`` last changed the config."""
    if "external_model" in entity:
        return external_backend(service, entity["external_model"], task, author or entity.get("creator") or "")
    if task == CUSTOM_TASK:
        from serving.data.custom_models import PyfuncBackend

        return PyfuncBackend(entity["_local_path"])
    path = entity.get("_local_path") or service.local_model_path(entity["entity_name"])
    if path is None:
        raise InvalidParameterValue(
            f"served entity {entity['name']!r} ({entity['entity_name']!r}) has no local model directory; "
            f"update the endpoint config so it is deployed again"
        )
    events = (lambda line: service.store.log(endpoint_id, entity["name"], "server", line)) if endpoint_id else None
    provisioning = Provisioning.of(entity)
    if provisioning is not None:  # reserved capacity: an engine of its own, admitted at its rate
        dedicated = DedicatedEngineBackend(str(path), task, f"{endpoint_id}/{entity['name']}", provisioning.units, events)
        return ProvisionedBackend(dedicated, provisioning, entity["name"])
    return LocalEngineBackend(str(path), task, idle_timeout=scale_to_zero_seconds(entity), events=events)


def scale_to_zero_seconds(entity: dict[str, Any]) -> float | None:
    """Idle seconds before a ``scale_to_zero_enabled`` entity's engine is unloaded
    (``SQLINFER_SCALE_TO_ZERO_IDLE_SECONDS``, default 1800: Databricks scales to zero after 30
    minutes without requests); None when scale to zero is off."""
    if not entity.get("scale_to_zero_enabled"):
        return None
    return float(os.environ.get("SQLINFER_SCALE_TO_ZERO_IDLE_SECONDS", "1800"))


def external_backend(service: EndpointService, external: dict[str, Any], task: Task, author: str) -> Backend:
    """An external model's backend; its key is resolved only when the first call is made.

    A referenced secret is resolved on behalf of whoever last changed the config, who must still
    be able to READ its scope; and the provider URL must still be inside the egress allow-list.
    """
    from serving.control.validation import provider_urls

    def secret(value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, dict) and SEALED in value:
            return service.secrets.unseal(value[SEALED])
        return service.secrets.resolve(value, "the endpoint's api key", service.auth.principal_named(author))

    urls = provider_urls(external)
    backend = _provider_backend(external, task, secret)
    return EgressCheckedBackend(backend, urls) if urls else backend


def _provider_backend(external: dict[str, Any], task: Task, secret: Callable[[Any], str | None]) -> Backend:
    from serving.data.providers import OpenAICompatibleBackend

    provider = external["provider"]
    if provider == "openai":
        config = external["openai_config"]
        api_type = config.get("openai_api_type") or "openai"
        if api_type == "azuread":
            raise InvalidParameterValue("openai_api_type 'azuread' (Microsoft Entra ID) cannot be called from here; use an API key")
        key = config.get("openai_api_key") or config.get("openai_api_key_plaintext")
        azure = {"api_version": config["openai_api_version"], "deployment": config.get("openai_deployment_name")} \
            if api_type == "azure" else None
        return OpenAICompatibleBackend(task, external["name"], config.get("openai_api_base") or "https://api.openai.com/v1",
                                       lambda: secret(key), azure=azure, organization=config.get("openai_organization"),
                                       max_concurrency=PROVIDER_CONCURRENCY)
    if provider == "custom":
        config = external["custom_provider_config"]
        auth = config.get("bearer_token_auth") or {}
        token = auth.get("token") or auth.get("token_plaintext")
        return OpenAICompatibleBackend(task, external["name"], config["custom_provider_url"], lambda: secret(token),
                                       max_concurrency=PROVIDER_CONCURRENCY, provider="custom")
    if provider == "anthropic":
        from serving.data.providers import AnthropicBackend

        config = external["anthropic_config"]
        key = config.get("anthropic_api_key") or config.get("anthropic_api_key_plaintext")
        return AnthropicBackend(task, external["name"], lambda: secret(key), max_concurrency=PROVIDER_CONCURRENCY)
    raise InvalidParameterValue(f"provider {provider!r} cannot be called by this build yet")


def endpoint_backend(service: EndpointService, config: dict[str, Any], fallback: bool = False,
                     endpoint_id: str | None = None) -> Backend:
    task = config["_task"]
    backends = {entity["name"]: entity_backend(service, entity, task, config.get("_author"), endpoint_id)
                for entity in config["served_entities"]}
    routes = [(route.get("served_entity_name") or route["served_model_name"], route["traffic_percentage"])
              for route in config["traffic_config"]["routes"]]
    built = [(name, weight, backends[name]) for name, weight in routes if weight > 0]
    primary: Backend = TaggedBackend(built[0][0], built[0][2]) if len(built) == 1 else TrafficSplitBackend(task, built)
    if fallback and len(backends) > 1:
        return FallbackBackend(primary, [(e["name"], backends[e["name"]]) for e in config["served_entities"]])
    return primary


def _worth_a_fallback(result: Any) -> bool:
    status = getattr(result, "error_status", None)
    return bool(result.error) and status is not None and (status == 429 or status >= 500)


class FallbackBackend(Backend):
    """``fallback_config.enabled``: a 429 or 5xx from one entity goes to the next entity, in the
    order the config lists them, until one answers; if all fail, the last error stands."""

    def __init__(self, primary: Backend, ordered: Sequence[tuple[str, Backend]]):
        self.primary, self.ordered, self.task = primary, list(ordered), primary.task
        self._position = {name: i for i, (name, _) in enumerate(self.ordered)}

    @property
    def native_async(self) -> bool:
        return self.primary.native_async and all(backend.native_async for _, backend in self.ordered)

    def _failed_whole(self, exc: SqlinferError, part: list[Any], name: str | None) -> list[Any]:
        """Every request of ``part`` failed by an entity that failed as a whole (e.g. its engine cannot start)."""
        failed = {"llm/v1/embeddings": EmbeddingResult, CUSTOM_TASK: PredictionResult}.get(self.task, GenerationResult)
        return [failed(error=exc.message, error_status=exc.http_status, served_entity=name) for _ in part]

    def _next_round(self, results: list[Any], tried: list[set]) -> dict[int, list[int]]:
        """Which entity each failed-but-worth-retrying request goes to next (entity index -> positions)."""
        by_next: dict[int, list[int]] = {}
        for i, result in enumerate(results):
            if not _worth_a_fallback(result):
                continue
            start = self._position.get(result.served_entity, -1) + 1
            following = [k for k in range(start, len(self.ordered)) if self.ordered[k][0] not in tried[i]]
            if following:
                by_next.setdefault(following[0], []).append(i)
        return by_next

    @staticmethod
    def _merge(results: list[Any], tried: list[set], positions: list[int], answers: list[Any], name: str) -> None:
        for i, answer in zip(positions, answers):
            results[i] = dataclasses.replace(answer, served_entity=name)
            tried[i].add(name)

    async def _awith_fallback(self, items: Sequence[Any], call: Callable[[Backend, list[Any]], Any]) -> list[Any]:
        async def attempt(backend: Backend, part: list[Any], name: str | None) -> list[Any]:
            try:
                return await call(backend, part)
            except SqlinferError as exc:
                return self._failed_whole(exc, part, name)

        first = self.primary.entity if isinstance(self.primary, TaggedBackend) else None
        results = await attempt(self.primary, list(items), first)
        tried = [{r.served_entity} for r in results]
        while by_next := self._next_round(results, tried):
            for k, positions in by_next.items():
                name, backend = self.ordered[k]
                self._merge(results, tried, positions, await attempt(backend, [items[i] for i in positions], name), name)
        return results

    async def achat(self, conversations, options):
        return await self._awith_fallback(conversations, lambda b, part: b.achat(part, options))

    async def acomplete(self, prompts, options):
        return await self._awith_fallback(prompts, lambda b, part: b.acomplete(part, options))

    async def aembed(self, texts):
        return await self._awith_fallback(texts, lambda b, part: b.aembed(part))

    def _with_fallback(self, items: Sequence[Any], call: Callable[[Backend, list[Any]], list[Any]],
                       on_result: ResultCallback | None) -> list[Any]:
        def attempt(backend: Backend, part: list[Any], name: str | None) -> list[Any]:
            try:
                return call(backend, part)
            except SqlinferError as exc:
                return self._failed_whole(exc, part, name)

        first = self.primary.entity if isinstance(self.primary, TaggedBackend) else None
        results = attempt(self.primary, list(items), first)
        tried = [{r.served_entity} for r in results]
        while by_next := self._next_round(results, tried):
            for k, positions in by_next.items():
                name, backend = self.ordered[k]
                self._merge(results, tried, positions, attempt(backend, [items[i] for i in positions], name), name)
        if on_result is not None:  # reported once, final answers only (so nothing is counted twice)
            for i, result in enumerate(results):
                on_result(i, result)
        return results

    def chat(self, conversations, options, on_result=None):
        return self._with_fallback(conversations, lambda b, part: b.chat(part, options), on_result)

    def complete(self, prompts, options, on_result=None):
        return self._with_fallback(prompts, lambda b, part: b.complete(part, options), on_result)

    def embed(self, texts, on_result=None):
        return self._with_fallback(texts, lambda b, part: b.embed(part), on_result)

    def stream(self, request, options, chat):
        """The first entity that starts answering streams; a 429/5xx before the first piece moves on."""
        first = self.primary.entity if isinstance(self.primary, TaggedBackend) else None
        candidates = [(first, self.primary)] + [(n, b) for n, b in self.ordered if n != first]
        failure: SqlinferError | None = None
        for name, backend in candidates:
            pieces = backend.stream(request, options, chat)
            try:
                opening = next(pieces, None)
            except SqlinferError as exc:
                if exc.http_status != 429 and exc.http_status < 500:
                    raise
                failure = exc
                continue
            if opening is not None:
                yield opening if name is None else dataclasses.replace(opening, served_entity=name)
            for delta in pieces:
                yield delta if name is None else dataclasses.replace(delta, served_entity=name)
            return
        assert failure is not None
        raise failure

    def predict(self, rows, params=None, on_result=None):
        return self._with_fallback(rows, lambda b, part: b.predict(part, params), on_result)

    def embedding_dimension(self) -> int | None:
        return self.primary.embedding_dimension()

    def count_tokens(self, requests, kind):
        return self.primary.count_tokens(requests, kind)

    def prefix_reuse(self, requests, kind):
        return self.primary.prefix_reuse(requests, kind)

    def warm_up(self) -> None:
        self.primary.warm_up()

    def close(self) -> None:
        for _, backend in self.ordered:
            backend.close()

    def release(self) -> None:
        for _, backend in self.ordered:
            backend.release()


class EgressCheckedBackend(DelegatingBackend):
    """Checks the provider's URLs against the egress allow-list before every call: the list may
    have narrowed since the endpoint was created (``serving.control.egress``)."""

    def __init__(self, inner: Backend, urls: list[tuple[str, str]]):
        super().__init__(inner)
        self.urls = urls

    def _check(self) -> None:
        from serving.control.egress import check_url

        for field, url in self.urls:
            check_url(url, f"external_model.{field}")

    native_async = property(async_like_inner)

    async def achat(self, conversations, options):
        self._check()
        return await self.inner.achat(conversations, options)

    async def acomplete(self, prompts, options):
        self._check()
        return await self.inner.acomplete(prompts, options)

    async def aembed(self, texts):
        self._check()
        return await self.inner.aembed(texts)

    def chat(self, conversations, options, on_result=None):
        self._check()
        return self.inner.chat(conversations, options, on_result)

    def complete(self, prompts, options, on_result=None):
        self._check()
        return self.inner.complete(prompts, options, on_result)

    def embed(self, texts, on_result=None):
        self._check()
        return self.inner.embed(texts, on_result)

    def stream(self, request, options, chat):
        self._check()
        return self.inner.stream(request, options, chat)


class TaggedBackend(DelegatingBackend):
    """One entity, answering for itself: its results carry its name."""

    def __init__(self, entity: str, backend: Backend):
        super().__init__(backend)
        self.entity = entity

    def _tag(self, results: list[Any]) -> list[Any]:
        return [dataclasses.replace(r, served_entity=self.entity) for r in results]

    native_async = property(async_like_inner)

    async def achat(self, conversations, options):
        return self._tag(await self.inner.achat(conversations, options))

    async def acomplete(self, prompts, options):
        return self._tag(await self.inner.acomplete(prompts, options))

    async def aembed(self, texts):
        return self._tag(await self.inner.aembed(texts))

    def chat(self, conversations, options, on_result=None):
        return self._tag(self.inner.chat(conversations, options, on_result))

    def complete(self, prompts, options, on_result=None):
        return self._tag(self.inner.complete(prompts, options, on_result))

    def embed(self, texts, on_result=None):
        return self._tag(self.inner.embed(texts, on_result))

    def predict(self, rows, params=None, on_result=None):
        return self._tag(self.inner.predict(rows, params, on_result))

    def stream(self, request, options, chat):
        for delta in self.inner.stream(request, options, chat):
            yield dataclasses.replace(delta, served_entity=self.entity)


class StoredEndpointResolver:
    """Finds registered (non-system) endpoints for an in-memory EndpointDirectory."""

    def __init__(self, service: EndpointService):
        self.service = service
        self.limiter = RateLimiter(service.db)
        self.recorder = UsageRecorder(service.db)

    def names(self) -> list[str]:
        return self.service.names()

    def rate_limits(self, name: str) -> list[dict[str, Any]]:
        if name.startswith(SYSTEM_PREFIX):
            return []
        return self.service.serving(name).rate_limits

    def throughput(self, name: str) -> float | None:
        """Requests per second the endpoint answered lately (its last 200 successful batches in
        the usage log; rows of one SQL batch share the batch's latency), or None if unknown."""
        self.recorder.flush()
        row = self.service.db.read().execute(
            "SELECT sum(n) AS rows, sum(latency_ms) AS ms FROM (SELECT count(*) AS n, latency_ms FROM usage "
            "WHERE endpoint_name = ? AND status_code = 200 GROUP BY timestamp_ms, latency_ms "
            "ORDER BY timestamp_ms DESC LIMIT 200)", (name,)).fetchone()
        return row["rows"] / (row["ms"] / 1000) if row["rows"] and row["ms"] else None

    def lookup(self, name: str) -> tuple[int, Task, Callable[[], Backend]] | None:
        """(config version, task, backend factory) of ``name``, or None if it is not registered."""
        if name.startswith(SYSTEM_PREFIX):
            return None
        try:
            serving = self.service.serving(name)
        except ResourceDoesNotExist:
            return None
        config = serving.config
        if not config.get("_task"):
            raise InvalidParameterValue(f"endpoint {name!r} has no task yet; wait until its config is deployed")

        def build() -> Backend:
            backend = endpoint_backend(self.service, config, serving.fallback, serving.endpoint_id)
            limits = limits_from(serving.rate_limits)
            if limits:
                backend = RateLimitedBackend(backend, self.limiter, serving.endpoint_id, name, limits)
            if serving.guardrails:
                # outside the rate limiter: a request a guardrail blocks is never sent, so it uses no
                # calls; inside usage recording: the usage table records what the guardrail did
                from serving.data.guardrails import GuardedBackend

                backend = GuardedBackend(backend, serving.guardrails, name)
            return UsageRecordingBackend(backend, self.recorder, serving.endpoint_id, name, serving.log_payloads)

        return serving.version, config["_task"], build, serving.cache_version
