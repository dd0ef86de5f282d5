"""The local inference engine: one vLLM ``AsyncLLM`` per model per process, shared by all callers.

Why async and shared: vLLM batches continuously, so the fastest way to answer many callers is
to let all their requests into one running batch. Each :class:`LocalEngine` owns an AsyncLLM that
lives on its own background event loop thread; callers on any thread submit a *whole batch at
once* with ``asyncio.run_coroutine_threadsafe`` and block until it drains (vLLM's ``LLM._run_engine`` pattern: submit everything, drain, restore input
order). Two DuckDB threads, a REST handler and a Spark task calling at the same time therefore
share one batch instead of queueing behind each other. One loop per engine, not one per process:
creating an AsyncLLM blocks its loop for the whole start (~30 s), and a shared loop would stall a
running chat engine while the embedding engine starts, and start engines one after the other.

Engines start lazily on first use (~30 s on CPU) and shut down cleanly at interpreter exit
(explicitly, so vLLM's ``__del__`` never runs against a half-torn-down interpreter and no
EngineCore child process is left behind). This is the only module that imports vllm.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Coroutine, Iterator, Sequence, TypeVar

from engine import cancellation
from engine.config import EngineConfig
from engine.errors import EngineError, InvalidParameterValue, RequestCancelled
from engine.model_store import ModelInfo, resolve_model
from engine.prefix_reuse import PrefixCache
from engine.types import (
    Choice,
    EmbeddingResult,
    GenerationResult,
    SamplingOptions,
    StreamDelta,
    TokenLogprob,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
ResultCallback = Callable[[int, Any], None]

# vLLM logs every engine step at INFO; a SQL user wants their table, not the engine's diary.
# Set VLLM_LOGGING_LEVEL=INFO to see it again.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
# No usage statistics phone-home: there is no network here, and users did not ask for it.
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


class _EventLoopThread:
    """One asyncio loop on a daemon thread, hosting one engine."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name=self._name, daemon=True
                )
                self._thread.start()
            return self._loop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for it; if the caller's cancel event is set
        meanwhile (``engine.cancellation``), cancel it: vLLM aborts the requests of a cancelled
        ``generate``/``encode`` task, so no more engine time is spent on them."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop())
        cancel = cancellation.current()
        if cancel is None:
            return future.result()
        while True:
            try:
                return future.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                if cancel.is_set():
                    future.cancel()
                    raise RequestCancelled("the caller went away; the engine's remaining requests were aborted") from None

    @property
    def native_id(self) -> int | None:
        thread = self._thread
        return thread.native_id if thread is not None else None

    def stop(self) -> None:
        with self._lock:
            if self._loop is None:
                return
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()
            self._loop, self._thread = None, None


_ENGINES: dict[tuple[str, str], "LocalEngine"] = {}
# Provisioned entities' engines, by owner: bound to cores of their own (engine.reservations).
_DEDICATED: dict[str, "LocalEngine"] = {}
# Niceness of shared engines (and their processes) while provisioned engines hold reserved cores.
SHARED_ENGINE_NICENESS = 10
_ENGINES_LOCK = threading.Lock()
_REQUEST_IDS = itertools.count()


class LocalEngine:
    """A lazily started vLLM engine for one model; thread-safe; batches submitted whole."""

    def __init__(self, model: ModelInfo, config: EngineConfig | None = None, cores: tuple[int, ...] | None = None):
        self.model = model
        self.config = config or EngineConfig.for_this_machine()
        # Dedicated engines compute on these cores only; shared ones (None) on the unreserved cores.
        self.cores = cores
        self.bound_cpus: tuple[int, ...] | None = None  # what the running engine was bound to
        self._rebind = False  # a shared engine runs on cores a provisioned engine reserved since
        self._llm: Any = None
        self._loop = _EventLoopThread(f"sqlinfer-engine-{model.name}")
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._start_lock = threading.Lock()
        # Requests inside vLLM right now, and the most there ever were at once: the proof that
        # separate callers joined one continuous batch. Touched only on the loop thread.
        self.in_flight = 0
        self.peak_in_flight = 0
        # Scale to zero: calls inside chat/complete/embed right now, when the last one ended, and
        # the idle time after which the reaper unloads the engine (None: never; pinned: an
        # endpoint without scale_to_zero uses it, so it stays loaded).
        self._use_lock = threading.Lock()
        self._active = 0
        self._last_used = time.monotonic()
        self._idle_timeout: float | None = None
        self._pinned = False
        self._starting = False
        self.scaled_to_zero_count = 0
        self.start_line = ""  # what the engine logged when it last started (build, dtype, threads, why)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._llm is not None

    @property
    def state(self) -> str:
        """RUNNING, STARTING, SCALED_TO_ZERO (unloaded while idle) or NOT_STARTED."""
        if self._llm is not None:
            return "RUNNING"
        if self._starting:
            return "STARTING"
        return "SCALED_TO_ZERO" if self.scaled_to_zero_count else "NOT_STARTED"

    def scale_to_zero_after(self, idle_seconds: float | None) -> None:
        """Unload after ``idle_seconds`` without calls; None pins the engine loaded for good.

        Several endpoints may share an engine: one that must stay warm wins, otherwise the
        shortest idle time does.
        """
        with self._use_lock:
            if idle_seconds is None:
                self._pinned = True
            elif self._idle_timeout is None or idle_seconds < self._idle_timeout:
                self._idle_timeout = float(idle_seconds)
        if not self._pinned and self._idle_timeout is not None:
            _REAPER.start()

    @contextlib.contextmanager
    def _serving(self):
        with self._use_lock:  # waits while the reaper is unloading this engine
            self._active += 1
        try:
            yield
        finally:
            with self._use_lock:
                self._active -= 1
                self._last_used = time.monotonic()

    def _scale_to_zero_if_idle(self, now: float) -> bool:
        if self._rebind and self._llm is not None and self.cores is None:
            with self._use_lock:
                if not self._active:
                    log.info("restarting %s off the cores reserved for provisioned engines", self.model.name)
                    self._rebind = False
                    self.close()  # the next call starts it on the unreserved cores
                    return True
            return False
        if self._pinned or self._idle_timeout is None or self._llm is None:
            return False
        with self._use_lock:
            if self._active or now - self._last_used < self._idle_timeout:
                return False
            log.info("scaling %s to zero after %.0f s idle", self.model.name, now - self._last_used)
            self.close()
            self.scaled_to_zero_count += 1
            return True

    def start(self) -> None:
        """Start the engine if it is not running (blocks ~30 s on CPU the first time)."""
        if self._llm is not None:
            return
        with self._start_lock:
            if self._llm is not None:
                return
            args = self.config.engine_args(str(self.model.path), self.model.runner)
            from engine.report import EngineReport

            env = self._binding_env()
            self.start_line = EngineReport.for_this_machine(self.config).line(self.model.name)
            bound = env.get("VLLM_CPU_OMP_THREADS_BIND")
            if bound and bound != self.config.cpu_threads_bind:  # provisioning moved it
                owner = "its reserved cores (provisioned)" if self.cores is not None else "the unreserved cores"
                self.start_line += f"; bound to CPUs {bound}, {owner}"
            log.info("%s", self.start_line)
            self._starting = True
            token = cancellation.CANCEL.set(None)  # a start runs to the end: cancelled, its engine would be orphaned
            if self.cores is not None:
                self._loop.run(_pin_loop_thread(self.cores))
            niceness = SHARED_ENGINE_NICENESS if self.cores is None and reservations_exist() else 0
            try:
                with _child_process_env(env):
                    self._llm = self._loop.run(_create_async_llm(args, niceness))
            except Exception as exc:  # vLLM raises many types; the user needs one clear story
                raise EngineError(
                    f"could not start the local engine for model {self.model.name!r} at "
                    f"{str(self.model.path)!r}: {type(exc).__name__}: {exc}. Engine settings can "
                    f"be changed with SQLINFER_ENGINE_* variables (e.g. "
                    f"SQLINFER_ENGINE_GPU_MEMORY_UTILIZATION=0.3)"
                ) from exc
            finally:
                self._starting = False
                cancellation.CANCEL.reset(token)
            self._tokenizer = self._llm.get_tokenizer()
            self._max_model_len = int(self._llm.vllm_config.model_config.max_model_len)
            self._last_used = time.monotonic()
            _register_atexit()

    def _binding_env(self) -> dict[str, str]:
        """The engine's child-process environment, with its threads bound to the cores it may use:
        its reserved cores if it is dedicated, else the unreserved ones when anything is reserved
        (unless the user chose a binding; then theirs is kept)."""
        from engine import reservations
        from engine.hardware import _cpu_list

        env = self.config.process_env()
        user_chose = self.config.reasons().get("cpu_threads_bind", "").startswith("set ") or \
            "VLLM_CPU_OMP_THREADS_BIND" in os.environ
        if self.cores is not None:
            self.bound_cpus = self.cores
            return env | {"VLLM_CPU_OMP_THREADS_BIND": _cpu_list(self.cores)}
        current = reservations.split()
        if current.reserved and not user_chose and current.shared:
            self.bound_cpus = current.shared
            return env | {"VLLM_CPU_OMP_THREADS_BIND": _cpu_list(current.shared)}
        self.bound_cpus = current.all_cores
        return env

    def rebind_when_idle(self) -> None:
        """Restart on the unreserved cores as soon as no call is running (a provisioned engine
        reserved cores this shared engine computes on)."""
        self._rebind = True
        _REAPER.start()

    def close(self) -> None:
        """Shut the engine down; the next request starts it again (used for scale-to-zero)."""
        with self._start_lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                try:
                    self._loop.run(_shutdown_async_llm(llm))
                except Exception:  # a dying engine must not stop the others from closing
                    log.exception("error while shutting down the engine for %s", self.model.name)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (benchmarks and comparisons start from the same state).

        True when the engine reset it; vLLM refuses (False) while requests are running.
        """
        if self._llm is None:
            return True
        return bool(self._loop.run(self._llm.reset_prefix_cache()))

    def settings(self) -> dict[str, Any]:
        """What the running engine actually uses, read from vLLM's own config (not ours)."""
        self.start()
        config = self._llm.vllm_config
        return {"dtype": str(config.model_config.dtype).removeprefix("torch."),
                "block_size": config.cache_config.block_size,
                "enable_prefix_caching": config.cache_config.enable_prefix_caching,
                "max_model_len": config.model_config.max_model_len}

    def prefix_cache(self) -> PrefixCache:
        """Block size and whether prefix caching is on: read from vLLM's config when the engine
        runs, else what it will start with (our config, or vLLM's default block where we set none)."""
        if self._llm is not None:
            cache = self._llm.vllm_config.cache_config
            return PrefixCache(bool(cache.enable_prefix_caching), int(cache.block_size), "the running engine's config")
        enabled = self.config.enable_prefix_caching and self.model.runner == "generate"
        if self.config.block_size is not None:
            return PrefixCache(enabled, self.config.block_size, "the engine config (not started yet)")
        import torch

        default = 16 if torch.cuda.is_available() else 128  # vLLM's defaults when none is set
        return PrefixCache(enabled, default, "vLLM's default block (not started yet)")

    @property
    def tokenizer(self) -> Any:
        self.start()
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        self.start()
        return self._max_model_len

    # -- generation ------------------------------------------------------------------------

    def chat(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        options: SamplingOptions | Sequence[SamplingOptions],
        on_result: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        """Answer every conversation (the model's chat template applied), in input order."""
        self._require("llm/v1/chat", "chat")
        with self._serving():
            return self._chat(conversations, options, on_result)

    def _chat(self, conversations, options, on_result) -> list[GenerationResult]:
        prompts: list[Any] = []
        for messages in conversations:
            try:
                prompts.append(self._chat_prompt(messages))
            except Exception as exc:  # a malformed conversation fails its own row only
                prompts.append(exc)
        return self._generate(prompts, options, on_result)

    def _chat_prompt(self, messages: Sequence[dict[str, str]]) -> dict[str, Any]:
        tokenizer = self.tokenizer
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    def stream(self, request: Sequence[dict[str, str]] | str, options: SamplingOptions, chat: bool) -> Iterator[StreamDelta]:
        """One request answered piece by piece as vLLM produces tokens (server-sent events).

        It joins the running batch like any other request; closing the iterator early (the
        client went away) aborts it inside vLLM.
        """
        self._require("llm/v1/chat" if chat else ("llm/v1/chat", "llm/v1/completions"), "chat" if chat else "completions")
        if options.n != 1:
            raise InvalidParameterValue(f"n={options.n} cannot be streamed; stream with n=1 or send the request without stream")
        with self._serving():
            self.start()
            try:
                prompt = self._chat_prompt(request) if chat else request
            except Exception as exc:
                raise InvalidParameterValue(f"invalid request: {exc}") from None
            yield from self._stream(prompt, _to_sampling_params(options, stream=True))

    def _stream(self, prompt: Any, params: Any) -> Iterator[StreamDelta]:
        pieces: queue.Queue = queue.Queue()
        end = object()

        async def pump() -> None:
            self._enter()
            try:
                async for output in self._llm.generate(prompt, params, f"sqlinfer-{next(_REQUEST_IDS)}"):
                    pieces.put(output)
            except BaseException as exc:  # cancelled (client gone) or failed: the consumer decides
                pieces.put(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                self.in_flight -= 1
                pieces.put(end)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop.loop())
        prompt_tokens = completion_tokens = 0
        finished = False
        try:
            while True:
                item = pieces.get()
                if item is end:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise EngineError(f"the engine failed while streaming: {_describe(item)}")
                piece = item.outputs[0]
                prompt_tokens = len(item.prompt_token_ids or ()) or prompt_tokens
                completion_tokens += len(piece.token_ids)
                yield StreamDelta(text=piece.text, finish_reason=piece.finish_reason,
                                  prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        finally:
            if not finished:
                future.cancel()  # AsyncLLM aborts a request whose generate() task is cancelled

    def complete(
        self,
        prompts: Sequence[str],
        options: SamplingOptions | Sequence[SamplingOptions],
        on_result: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        """Continue every raw prompt (no chat template), in input order."""
        self._require(("llm/v1/chat", "llm/v1/completions"), "completions")
        with self._serving():
            return self._generate(list(prompts), options, on_result)

    def embed(self, texts: Sequence[str], on_result: ResultCallback | None = None) -> list[EmbeddingResult]:
        """Embed every text (truncated to the model's length), in input order."""
        self._require("llm/v1/embeddings", "embeddings")
        with self._serving():
            tokenizer, limit = self.tokenizer, self.max_model_len
            token_ids = tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"] if texts else []
            return self._loop.run(self._embed_all(token_ids, on_result))

    def _require(self, tasks: str | tuple[str, ...], what: str) -> None:
        allowed = (tasks,) if isinstance(tasks, str) else tasks
        if self.model.task not in allowed:
            raise InvalidParameterValue(
                f"model {self.model.name!r} serves {self.model.task}, not {what}; use an endpoint "
                f"whose task is {' or '.join(allowed)}"
            )

    def _generate(
        self,
        prompts: list[Any],
        options: SamplingOptions | Sequence[SamplingOptions],
        on_result: ResultCallback | None,
    ) -> list[GenerationResult]:
        per_prompt = [options] * len(prompts) if isinstance(options, SamplingOptions) else list(options)
        if len(per_prompt) != len(prompts):
            raise InvalidParameterValue(
                f"got {len(per_prompt)} sampling options for {len(prompts)} prompts; give one, or one per prompt"
            )
        self.start()
        # A batch usually repeats one options object; convert each distinct object once.
        params_by_id: dict[int, Any] = {}
        sampling = []
        for option in per_prompt:
            if id(option) not in params_by_id:
                params_by_id[id(option)] = _to_sampling_params(option)
            sampling.append(params_by_id[id(option)])
        return self._loop.run(self._generate_all(prompts, sampling, on_result))

    async def _generate_all(self, prompts: list[Any], sampling: list[Any], on_result: ResultCallback | None) -> list[GenerationResult]:
        async def one(index: int, prompt: Any, params: Any) -> GenerationResult:
            if isinstance(prompt, Exception):
                result = GenerationResult(error=f"invalid request: {prompt}")
            else:
                self._enter()
                try:
                    final = None
                    async for output in self._llm.generate(prompt, params, f"sqlinfer-{next(_REQUEST_IDS)}"):
                        final = output
                    result = _to_generation_result(final)
                except Exception as exc:  # e.g. a prompt longer than max_model_len: this row only
                    result = GenerationResult(error=_describe(exc), error_status=_status_of(exc))
                finally:
                    self.in_flight -= 1
            if on_result is not None:
                on_result(index, result)
            return result

        return list(await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(zip(prompts, sampling)))))

    async def _embed_all(self, token_ids: list[list[int]], on_result: ResultCallback | None) -> list[EmbeddingResult]:
        from vllm.pooling_params import PoolingParams

        params = PoolingParams(task="embed")

        async def one(index: int, ids: list[int]) -> EmbeddingResult:
            self._enter()
            try:
                final = None
                prompt = {"prompt_token_ids": ids}
                async for output in self._llm.encode(prompt, params, f"sqlinfer-{next(_REQUEST_IDS)}"):
                    final = output
                vector = final.outputs.data.float().tolist()
                result = EmbeddingResult(vector=vector, prompt_tokens=len(ids))
            except Exception as exc:
                result = EmbeddingResult(error=_describe(exc), error_status=_status_of(exc))
            finally:
                self.in_flight -= 1
            if on_result is not None:
                on_result(index, result)
            return result

        return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(token_ids))))


    def _enter(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)


def _status_of(exc: BaseException) -> int:
    """400 when vLLM refused the request itself (its ``VLLMClientError``s, e.g. a prompt longer
    than the context, and plain ValueErrors from validation); 503 when the engine failed (dead,
    out of memory): that is retriable, and a fallback entity is tried as for an upstream 5xx."""
    from vllm.exceptions import VLLMClientError, VLLMServerError

    if isinstance(exc, VLLMServerError):
        return 503
    return 400 if isinstance(exc, (VLLMClientError, ValueError, TypeError)) else 503


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# The engine's child processes inherit the environment: while they start, silence the library
# deprecation chatter they would print on every run (users can still set these themselves).
_QUIET_CHILD_ENV = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning", "TORCH_CPP_LOG_LEVEL": "ERROR"}


_CHILD_ENV = threading.Condition()
_CHILD_ENV_SET: dict[str, str] = {}  # what engine starts under way added to os.environ
_CHILD_ENV_USERS = 0


@contextlib.contextmanager
def _child_process_env(settings: dict[str, str]) -> Iterator[None]:
    """``settings`` plus the quiet-child variables in ``os.environ`` while an engine starts (its
    child processes inherit them), then removed again.

    Engines may start at the same time on their own loops; they share the variables, and a start
    that needs a different value of one waits until the others have spawned their processes.
    """
    global _CHILD_ENV_USERS
    wanted = {**{k: v for k, v in _QUIET_CHILD_ENV.items() if k not in os.environ or k in _CHILD_ENV_SET}, **settings}
    with _CHILD_ENV:
        _CHILD_ENV.wait_for(lambda: _CHILD_ENV_USERS == 0 or all(_CHILD_ENV_SET.get(k, v) == v for k, v in wanted.items()))
        for key, value in wanted.items():
            if key not in os.environ:
                _CHILD_ENV_SET[key] = value
                os.environ[key] = value
        _CHILD_ENV_USERS += 1
    try:
        yield
    finally:
        with _CHILD_ENV:
            _CHILD_ENV_USERS -= 1
            if _CHILD_ENV_USERS == 0:
                for key in _CHILD_ENV_SET:
                    os.environ.pop(key, None)
                _CHILD_ENV_SET.clear()
                _CHILD_ENV.notify_all()


def reservations_exist() -> bool:
    from engine import reservations

    return bool(reservations.split().reserved)


@contextlib.contextmanager
def _spawning_niced(niceness: int) -> Iterator[None]:
    """Spawn the engine's processes at a lower priority (Linux niceness is per thread and
    inherited by the processes a thread starts), then give the loop thread its priority back.

    Used for shared engines while cores are reserved: on the unreserved cores, the server's
    threads (every endpoint's requests pass through them) and each engine's front end then run
    before pay-per-token compute. Only the processes are niced: a niced front end would be
    preempted while holding the interpreter lock and stall the whole server.
    """
    import resource

    before = os.getpriority(os.PRIO_PROCESS, 0)
    # Giving the priority back needs CAP_SYS_NICE or RLIMIT_NICE (root has it, most users not):
    # without it the loop thread would stay niced, which is worse than not nicing at all.
    may_restore = os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20 - before
    if niceness <= before or not may_restore:
        yield
        return
    os.setpriority(os.PRIO_PROCESS, 0, niceness)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)


async def _pin_loop_thread(cores: tuple[int, ...]) -> None:
    from engine import reservations

    reservations.pin_this_thread(cores)


async def _create_async_llm(args: dict[str, Any], niceness: int = 0) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    with _spawning_niced(niceness):
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))


async def _shutdown_async_llm(llm: Any) -> None:
    llm.shutdown()


def _to_sampling_params(options: SamplingOptions, stream: bool = False) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    kwargs: dict[str, Any] = {"n": options.n, "output_kind": kind}
    for name in ("max_tokens", "temperature", "top_p", "seed", "logprobs", "frequency_penalty", "presence_penalty"):
        value = getattr(options, name)
        if value is not None:
            kwargs[name] = value
    if options.logit_bias:
        try:
            kwargs["logit_bias"] = {int(token): float(bias) for token, bias in options.logit_bias.items()}
        except ValueError:
            raise InvalidParameterValue(f"logit_bias keys must be token ids, got {sorted(options.logit_bias)[:3]}") from None
    if "max_tokens" not in kwargs:
        kwargs["max_tokens"] = None  # OpenAI semantics: up to the model's context, not vLLM's 16
    if options.stop:
        kwargs["stop"] = list(options.stop)
    if options.json_schema is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(json=options.json_schema)
    elif options.choice is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(choice=list(options.choice))
    from vllm.exceptions import VLLMClientError

    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError, VLLMClientError) as exc:  # e.g. n > 1 with greedy sampling
        raise InvalidParameterValue(f"invalid sampling options {options.model_dump(exclude_none=True)}: {exc}") from None


def _to_generation_result(output: Any) -> GenerationResult:
    choices = []
    completion_tokens = 0
    for completion in output.outputs:
        completion_tokens += len(completion.token_ids)
        logprobs = None
        if completion.logprobs is not None:
            logprobs = tuple(
                _token_logprob(token_id, position)
                for token_id, position in zip(completion.token_ids, completion.logprobs)
            )
        choices.append(Choice(text=completion.text, finish_reason=completion.finish_reason, logprobs=logprobs))
    return GenerationResult(
        choices=tuple(choices),
        prompt_tokens=len(output.prompt_token_ids or ()),
        completion_tokens=completion_tokens,
        cached_tokens=int(getattr(output, "num_cached_tokens", 0) or 0),
    )


def _token_logprob(token_id: int, position: dict[int, Any]) -> TokenLogprob:
    chosen = position[token_id]
    alternatives = tuple(
        (entry.decoded_token or "", float(entry.logprob))
        for _, entry in sorted(position.items(), key=lambda item: item[1].rank or 0)
    )
    return TokenLogprob(token=chosen.decoded_token or "", logprob=float(chosen.logprob), top_logprobs=alternatives)


def get_engine(model: str, config: EngineConfig | None = None) -> LocalEngine:
    """The process-wide engine for a bundled model name or a local model directory."""
    info = resolve_model(model)
    key = (str(info.path), info.runner)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = LocalEngine(info, config)
        return engine


def dedicated_engine(model: str, owner: str, cores: tuple[int, ...], config: EngineConfig | None = None) -> LocalEngine:
    """The engine of a provisioned served entity (``owner``), on ``cores`` of its own. An owner
    whose cores changed gets a new engine (the old one is closed)."""
    info = resolve_model(model)
    with _ENGINES_LOCK:
        engine = _DEDICATED.get(owner)
        if engine is not None and engine.cores == cores and engine.model.path == info.path:
            return engine
        _DEDICATED[owner] = LocalEngine(info, config, cores=cores)
    if engine is not None:
        _retire(engine)
    return _DEDICATED[owner]


def close_dedicated(owner: str) -> None:
    with _ENGINES_LOCK:
        engine = _DEDICATED.pop(owner, None)
    if engine is not None:
        _retire(engine)


def _retire(engine: LocalEngine) -> None:
    """Close a dedicated engine for good: its loop thread ends and leaves the reserved cores' list."""
    from engine import reservations

    engine.close()
    native_id = engine._loop.native_id
    engine._loop.stop()
    if native_id is not None:
        reservations.unpin_thread(native_id)


def _shared_engines_off_reserved_cores() -> None:
    """After a reservation changed: shared engines bound to other cores than the unreserved ones
    now (on a reserved core, or kept off one that was freed) restart there when idle; one still
    starting is checked once it has started."""
    from engine import reservations

    current = reservations.split()
    wanted = set(current.shared if current.reserved else current.all_cores)
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
    for engine in engines:
        if (engine.is_running or engine._starting) and engine.bound_cpus is not None and set(engine.bound_cpus) != wanted:
            engine.rebind_when_idle()


def engine_states() -> dict[str, str]:
    """The state of every engine of this process, by model directory."""
    with _ENGINES_LOCK:
        return {path: engine.state for (path, _), engine in _ENGINES.items()}


class _Reaper:
    """One daemon thread that unloads engines idle past their scale-to-zero time."""

    def __init__(self, period: float = 0.5):
        self.period = period
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sqlinfer-scale-to-zero", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            with _ENGINES_LOCK:
                engines = list(_ENGINES.values()) + list(_DEDICATED.values())
            for engine in engines:
                try:
                    engine._scale_to_zero_if_idle(time.monotonic())
                except Exception:  # one engine failing to stop must not end the reaper
                    log.exception("scale to zero failed for %s", engine.model.name)


_REAPER = _Reaper()


def shutdown_all() -> None:
    """Stop every engine of this process and the loop they run on."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values()) + list(_DEDICATED.values())
    for engine in engines:
        engine.close()
        engine._loop.stop()


_ATEXIT_REGISTERED = False


def _register_atexit() -> None:
    global _ATEXIT_REGISTERED
    if not _ATEXIT_REGISTERED:
        _ATEXIT_REGISTERED = True
        atexit.register(shutdown_all)


def _listen_to_reservations() -> None:
    from engine import reservations

    reservations.on_change(reservations.keep_this_process_off_reserved_cores)
    reservations.on_change(_shared_engines_off_reserved_cores)


_listen_to_reservations()
