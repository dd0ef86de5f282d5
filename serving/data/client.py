"""How the SQL functions reach the serving layer.

:class:`ServingClient` is the one interface ``ai_functions`` calls: whole batches per endpoint,
results in input order. :class:`InProcessClient` serves from an endpoint directory in this process (DuckDB,
tests, one machine); an HTTP client to ``sqlinfer serve`` with the same interface lets many Spark
executors share one engine.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

from engine.types import EmbeddingResult, GenerationResult, PredictionResult, SamplingOptions, StreamDelta, Task
from serving.data.backends import Conversation, ResultCallback
from engine.prefix_reuse import PrefixReuse
from serving.data.directory import EndpointDirectory, default_directory


class ServingClient(Protocol):
    def endpoints(self) -> list[tuple[str, Task]]: ...

    def task(self, endpoint: str) -> Task: ...

    def embedding_dimension(self, endpoint: str) -> int | None: ...

    def warm_up(self, endpoint: str) -> None: ...

    def config_version(self, endpoint: str) -> str | None:
        """What stored answers of ``endpoint`` are keyed by; None if they must not be stored."""
        ...

    def chat(
        self, endpoint: str, conversations: Sequence[Conversation], options: SamplingOptions,
        on_result: ResultCallback | None = None,
    ) -> list[GenerationResult]: ...

    def complete(
        self, endpoint: str, prompts: Sequence[str], options: SamplingOptions,
        on_result: ResultCallback | None = None,
    ) -> list[GenerationResult]: ...

    def embed(
        self, endpoint: str, texts: Sequence[str], on_result: ResultCallback | None = None
    ) -> list[EmbeddingResult]: ...

    def predict(
        self, endpoint: str, rows: Sequence[Any], params: dict[str, Any] | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[PredictionResult]: ...

    def stream(
        self, endpoint: str, request: Conversation | str, options: SamplingOptions, chat: bool
    ) -> Iterator[StreamDelta]: ...


class InProcessClient:
    """Serves requests from an endpoint directory in this process (the default one if none given)."""

    def __init__(self, directory: EndpointDirectory | None = None):
        self.directory = directory or default_directory()

    def endpoints(self) -> list[tuple[str, Task]]:
        return [(endpoint.name, endpoint.task) for endpoint in self.directory.endpoints()]

    def task(self, endpoint: str) -> Task:
        return self.directory.endpoint(endpoint).task

    def embedding_dimension(self, endpoint: str) -> int | None:
        return self.directory.backend(endpoint).embedding_dimension()

    def warm_up(self, endpoint: str) -> None:
        self.directory.backend(endpoint).warm_up()

    def config_version(self, endpoint: str) -> str | None:
        return self.directory.endpoint(endpoint).cache_version

    def count_tokens(self, endpoint: str, requests: Sequence[Any], kind: str) -> list[int] | None:
        return self.directory.backend(endpoint).count_tokens(requests, kind)

    def prefix_reuse(self, endpoint: str, requests: Sequence[Any], kind: str) -> PrefixReuse:
        """What the engine's prefix cache will reuse for ``requests`` sent in this order (explain)."""
        return self.directory.backend(endpoint).prefix_reuse(requests, kind)

    def throughput(self, endpoint: str) -> float | None:
        """Requests per second the endpoint answered lately, from the usage log; None if unknown."""
        return self.directory.throughput(endpoint)

    def rate_limits(self, endpoint: str) -> list[dict[str, Any]]:
        """The endpoint's rate limits (calls/tokens per minute), [] for none."""
        lookup = getattr(self.directory, "rate_limits", None)
        return lookup(endpoint) if lookup else []

    def chat(self, endpoint, conversations, options, on_result=None):
        return self.directory.backend(endpoint).chat(conversations, options, on_result)

    def complete(self, endpoint, prompts, options, on_result=None):
        return self.directory.backend(endpoint).complete(prompts, options, on_result)

    def embed(self, endpoint, texts, on_result=None):
        return self.directory.backend(endpoint).embed(texts, on_result)

    def predict(self, endpoint, rows, params=None, on_result=None):
        return self.directory.backend(endpoint).predict(rows, params, on_result)

    def stream(self, endpoint, request, options, chat):
        return self.directory.backend(endpoint).stream(request, options, chat)
