"""The backend seam: one interface for everything that can answer an endpoint.

A :class:`Backend` answers a *whole batch* of requests in one call and returns results in input
order, with a per-request error instead of an exception when one row fails. The SQL functions,
the REST server and tests all talk to this interface only, so a local vLLM engine, an external
provider or a test double are interchangeable behind an endpoint name.

:class:`EchoBackend` is the official test double (like httpx's ``MockTransport``): it answers
instantly and deterministically, so the SQL machinery can be exercised and benchmarked without a
model. It ships with the library; register it under any endpoint name.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from abc import ABC
from typing import Any, Callable, Iterator, Sequence

from engine.errors import InvalidParameterValue
from engine.prefix_reuse import PrefixReuse
from engine.types import Choice, EmbeddingResult, GenerationResult, PredictionResult, SamplingOptions, StreamDelta, Task

ResultCallback = Callable[[int, Any], None]
Conversation = Sequence[dict[str, Any]]  # OpenAI messages: role, content, and tool_calls / tool_call_id


class Backend(ABC):
    """What serves one endpoint. Subclasses implement the methods of their task.

    ``achat``/``acomplete``/``aembed`` are the same calls for an async caller (the REST server's
    loop). A backend whose whole chain answers them without a thread says so with
    ``native_async``; the default runs the blocking call on a worker thread.
    """

    task: Task
    native_async: bool = False

    async def achat(self, conversations: Sequence[Conversation], options: SamplingOptions) -> list[GenerationResult]:
        return await asyncio.to_thread(self.chat, conversations, options)

    async def acomplete(self, prompts: Sequence[str], options: SamplingOptions) -> list[GenerationResult]:
        return await asyncio.to_thread(self.complete, prompts, options)

    async def aembed(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        return await asyncio.to_thread(self.embed, texts)

    def chat(
        self, conversations: Sequence[Conversation], options: SamplingOptions, on_result: ResultCallback | None = None
    ) -> list[GenerationResult]:
        raise self._unsupported("chat")

    def complete(
        self, prompts: Sequence[str], options: SamplingOptions, on_result: ResultCallback | None = None
    ) -> list[GenerationResult]:
        raise self._unsupported("completions")

    def embed(self, texts: Sequence[str], on_result: ResultCallback | None = None) -> list[EmbeddingResult]:
        raise self._unsupported("embeddings")

    def predict(
        self, rows: Sequence[Any], params: dict[str, Any] | None = None, on_result: ResultCallback | None = None
    ) -> list[PredictionResult]:
        """Custom models: one prediction per input row (a dict of columns or one instance)."""
        raise self._unsupported("custom-model predictions (dataframe_records, instances...)")

    def stream(self, request: Conversation | str, options: SamplingOptions, chat: bool) -> Iterator[StreamDelta]:
        """One chat (``chat``) or completion request answered piece by piece, for SSE.

        This default answers the whole request first and yields it as one piece, so every
        backend can stream; the local engine and OpenAI-compatible providers stream token by token.
        """
        [result] = self.chat([request], options) if chat else self.complete([request], options)
        if result.error:
            from serving.errors import row_error

            raise row_error(f"the model could not answer: {result.error}", result.error_status)
        choice = result.choices[0] if result.choices else None
        yield StreamDelta(text=result.text or "", finish_reason=choice.finish_reason if choice else "stop",
                          prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                          served_entity=result.served_entity, tool_calls=choice.tool_calls if choice else ())

    def embedding_dimension(self) -> int | None:
        """Vector length for embedding backends, known without running a model; else None."""
        return None

    def count_tokens(self, requests: Sequence[Any], kind: str) -> list[int] | None:
        """Input tokens per request with the model's own tokenizer, without running it; None if
        this backend cannot tell (external providers: their tokenizers are not here)."""
        return None

    def prefix_reuse(self, requests: Sequence[Any], kind: str) -> PrefixReuse:
        """Prompt tokens the engine's prefix cache will reuse for ``requests`` sent in this order
        (chat: user messages, complete: prompts), or why this backend cannot tell."""
        return PrefixReuse(unknown_because="the endpoint's model does not run on a local engine here "
                                           "(an external provider's own prompt caching is not estimated)")

    def warm_up(self) -> None:
        """Get ready to answer (start an engine, open connections) before the first request."""

    def close(self) -> None:
        """Release what the backend holds (an engine, connections). It may be used again after."""

    def release(self) -> None:
        """Drop this handle (its endpoint got a new config). Resources shared with others stay."""
        self.close()

    def _unsupported(self, what: str) -> InvalidParameterValue:
        return InvalidParameterValue(f"this endpoint serves {self.task}, not {what}")


class DelegatingBackend(Backend):
    """A backend wrapped around another (limits, usage, tags): everything but the calls delegates.

    A layer that implements the async calls too declares ``native_async`` as its inner's
    (:func:`async_like_inner`); one that does not stays ``False``, so its own logic is never skipped.
    """

    def __init__(self, inner: Backend):
        self.inner = inner
        self.task = inner.task

    def embedding_dimension(self) -> int | None:
        return self.inner.embedding_dimension()

    def count_tokens(self, requests, kind):
        return self.inner.count_tokens(requests, kind)

    def prefix_reuse(self, requests, kind):
        return self.inner.prefix_reuse(requests, kind)

    def warm_up(self) -> None:
        self.inner.warm_up()

    def close(self) -> None:
        self.inner.close()

    def release(self) -> None:
        self.inner.release()


def async_like_inner(layer: DelegatingBackend) -> bool:
    """``native_async`` of a layer that implements the async calls: its inner backend's."""
    return layer.inner.native_async


class LocalEngineBackend(Backend):
    """A bundled model or a local Hugging Face directory, served by the in-process vLLM engine.

    ``idle_timeout``: the served entity's ``scale_to_zero_enabled`` — the engine is unloaded after
    that many idle seconds and starts again on the next request. None keeps it loaded.
    """

    def __init__(self, model: str, task: Task, engine_config: Any = None, idle_timeout: float | None = None,
                 events: Callable[[str], None] | None = None):
        self.model = model
        self.task = task
        self._engine_config = engine_config
        self._idle_timeout = idle_timeout
        self._engine: Any = None
        self._events = events  # the served entity's server log (engine starts, failures)
        self._attached = False  # whether that log already names the engine serving this entity

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from engine.vllm_engine import get_engine

            engine = get_engine(self.model, self._engine_config)
            engine.scale_to_zero_after(self._idle_timeout)
            self._engine = engine
        return self._started(self._engine)

    def _started(self, engine: Any) -> Any:
        """The engine, started now if it is not running, with its start in the entity's log."""
        if self._events is None:
            return engine
        if engine.is_running:
            if not self._attached:  # an engine another endpoint started: this entity's log still says who serves it
                self._attached = True
                self._events(f"serving from the local engine for {self.model}, already running: {engine.start_line}")
            return engine
        self._attached = True
        import time

        from engine.errors import SqlinferError

        self._events(f"starting the local engine for {self.model}" + (" (after scaling to zero)" if engine.scaled_to_zero_count else ""))
        began = time.perf_counter()
        try:
            engine.start()
        except SqlinferError as exc:
            self._events(f"the engine failed to start: {exc.message}")
            raise
        self._events(f"engine ready in {time.perf_counter() - began:.1f} s: {engine.start_line}")
        return engine

    def chat(self, conversations, options, on_result=None):
        if self.task == "llm/v1/completions":
            raise self._unsupported("chat")
        if not _has_tools(conversations, options):
            return self.engine.chat(conversations, options, on_result)
        from serving.data import local_tools

        rendered, engine_options, plan = local_tools.prepare(conversations, options)
        results = local_tools.finish(self.engine.chat(rendered, engine_options), plan)
        for index, result in enumerate(results if on_result is not None else ()):
            on_result(index, result)
        return results

    def complete(self, prompts, options, on_result=None):
        return self.engine.complete(prompts, options, on_result)

    def embed(self, texts, on_result=None):
        return self.engine.embed(texts, on_result)

    def stream(self, request, options, chat):
        if chat and self.task == "llm/v1/completions":
            raise self._unsupported("chat")
        if chat and _has_tools([request], options):  # a tool call is answered whole, then streamed as one piece
            return Backend.stream(self, request, options, chat)
        return self.engine.stream(request, options, chat)

    def embedding_dimension(self) -> int | None:
        if self.task != "llm/v1/embeddings":
            return None
        from engine.model_store import embedding_dimension, resolve_model

        return embedding_dimension(resolve_model(self.model).path)

    def count_tokens(self, requests, kind):
        from engine.model_store import resolve_model
        from engine.tokens import count_tokens

        return count_tokens(str(resolve_model(self.model).path), requests, kind)

    def prefix_reuse(self, requests, kind):
        from engine.model_store import resolve_model
        from engine.prefix_reuse import estimate
        from engine.tokens import prompt_token_ids
        from engine.vllm_engine import get_engine

        engine = self._engine or get_engine(self.model, self._engine_config)  # its settings, not started
        cache = engine.prefix_cache()
        if not cache.enabled:
            return PrefixReuse(unknown_because="prefix caching is off for this engine (SQLINFER_ENGINE_ENABLE_PREFIX_CACHING)")
        return estimate(prompt_token_ids(str(resolve_model(self.model).path), requests, kind), cache.block_size)

    def warm_up(self) -> None:
        self.engine.start()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def release(self) -> None:
        """The engine is shared per model directory by every endpoint of the process: keep it."""


def _has_tools(conversations: Sequence[Conversation], options: SamplingOptions) -> bool:
    """Whether a chat request involves tools: offered now, or called earlier in the conversation."""
    return bool(options.tools) or any(m.get("tool_calls") or m.get("role") == "tool" for c in conversations for m in c)


class EchoBackend(Backend):
    """Answers instantly: chat echoes the last user message, embeddings hash the text.

    ``fail_on`` makes rows whose text contains that marker fail (per-row error), for testing
    error paths. Usage counts whitespace-separated words as tokens.
    """

    def __init__(self, task: Task = "llm/v1/chat", dimension: int = 8, fail_on: str | None = None):
        self.task = task
        self.dimension = dimension
        self.fail_on = fail_on
        self.calls: list[int] = []  # batch sizes, so tests can see how requests were grouped

    def _answer(self, text: str, options: SamplingOptions) -> GenerationResult:
        if self.fail_on is not None and self.fail_on in text:
            return GenerationResult(error=f"echo backend refused a request containing {self.fail_on!r}")
        words = text.split()
        limit = options.max_tokens
        reply = " ".join(words[:limit]) if limit is not None else text
        finish = "length" if limit is not None and len(words) > limit else "stop"
        return GenerationResult(
            choices=(Choice(text=reply, finish_reason=finish),) * options.n,
            prompt_tokens=len(words),
            completion_tokens=len(reply.split()) * options.n,
        )

    def chat(self, conversations, options, on_result=None):
        self.calls.append(len(conversations))
        results = []
        for index, messages in enumerate(conversations):
            user_turns = [m.get("content", "") for m in messages if m.get("role") == "user"]
            results.append(self._answer(user_turns[-1] if user_turns else "", options))
            if on_result is not None:
                on_result(index, results[-1])
        return results

    def complete(self, prompts, options, on_result=None):
        return self.chat([[{"role": "user", "content": p}] for p in prompts], options, on_result)

    def embed(self, texts, on_result=None):
        self.calls.append(len(texts))
        results = []
        for index, text in enumerate(texts):
            if self.fail_on is not None and self.fail_on in text:
                result = EmbeddingResult(error=f"echo backend refused a request containing {self.fail_on!r}")
            else:
                digest = hashlib.sha256(text.encode()).digest()
                raw = [digest[i % len(digest)] - 127.5 for i in range(self.dimension)]
                norm = math.sqrt(sum(x * x for x in raw)) or 1.0
                result = EmbeddingResult(vector=[x / norm for x in raw], prompt_tokens=len(text.split()))
            results.append(result)
            if on_result is not None:
                on_result(index, result)
        return results

    def embedding_dimension(self) -> int | None:
        return self.dimension if self.task == "llm/v1/embeddings" else None
