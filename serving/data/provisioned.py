"""Provisioned throughput for local entities: an engine on cores of its own, admitted at its rate.

A served entity with ``provisioned_model_units`` (or ``min/max_provisioned_throughput``, in
multiples of the model's measured ``throughput_chunk_size``, see ``engine.throughput``) gets:

* **its own engine**, bound to one reserved CPU core per model unit (``engine.reservations``),
  with a KV cache and batch size sized for its units; the shared pay-per-token engines move to
  the other cores, so a flood of pay-per-token requests cannot take its compute;
* **admission at its rate**: a :class:`ThroughputGate` paces requests so that the tokens they
  cost (prompt + ``max_tokens`` when admitted, corrected to the tokens really used when they
  finish) flow at the provisioned tokens per second, with one second of burst. Requests beyond
  the rate queue for up to ``SQLINFER_PROVISIONED_QUEUE_SECONDS`` (default 30) with at most
  ``SQLINFER_PROVISIONED_MAX_WAITERS`` (64) callers waiting; beyond that a REST caller gets ``429
  REQUEST_LIMIT_EXCEEDED`` with ``Retry-After``, and SQL batches wait (until their caller goes
  away). A single request costing more than the whole queue is a 400 naming ``max_tokens``. The
  gate belongs to the entity, not to a backend object: rebuilding a backend keeps its pacing.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from serving.data.backends import DelegatingBackend, LocalEngineBackend
from serving.data.limits import limit_mode
from engine import cancellation
from serving.errors import InvalidParameterValue, RequestCancelled, RequestLimitExceeded

BURST_SECONDS = 1.0
DEFAULT_MAX_TOKENS = 256  # what a request without max_tokens is assumed to cost until it finishes
CONTEXT_TOKENS = 2048  # no answer is longer than the engine's context (EngineConfig.max_model_len)


def queue_seconds() -> float:
    return float(os.environ.get("SQLINFER_PROVISIONED_QUEUE_SECONDS", "30"))


@dataclass(frozen=True)
class Provisioning:
    """What a provisioned entity reserved (set by the deployer in the stored entity)."""

    units: int
    tokens_per_second: float

    @classmethod
    def of(cls, entity: dict[str, Any]) -> "Provisioning | None":
        if not entity.get("_provisioned_units"):
            return None
        return cls(int(entity["_provisioned_units"]), float(entity["_provisioned_tokens_per_second"]))


class ThroughputGate:
    """Paces work to ``rate`` tokens per second (GCRA: each admission moves a theoretical
    arrival time forward by its cost; a caller waits until its turn, or is refused when its
    turn is more than the queue bound away or too many callers wait already)."""

    def __init__(self, rate: float, name: str, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate, self.name = float(rate), name
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._due = 0.0  # when the work admitted so far is done at the rate (the theoretical arrival time)
        self.waiting = 0

    def admit(self, cost: float, wait: bool) -> None:
        bound = queue_seconds()
        if not wait and cost / self.rate > bound + BURST_SECONDS:
            raise InvalidParameterValue(
                f"this request alone is {cost:.0f} tokens ({cost / self.rate:.0f} s of endpoint {self.name!r}'s "
                f"provisioned {self.rate:.0f} tokens/s, more than its {bound:.0f} s queue): lower max_tokens or n, "
                f"or send fewer rows at once")
        with self._lock:
            now = self._clock()
            due = max(self._due, now)
            delay = max(0.0, due - now - BURST_SECONDS)
            if not wait and delay > 0 and (delay > bound or self.waiting >= max_waiters()):
                ahead = f"{delay:.0f} s of admitted work ahead" if delay > bound else f"{self.waiting} callers waiting"
                raise RequestLimitExceeded(
                    f"endpoint {self.name!r} is provisioned for {self.rate:.0f} tokens/s and its queue is full "
                    f"({ahead}; the bound is {bound:.0f} s and {max_waiters()} callers); retry later or provision "
                    f"more model units", retry_after_seconds=max(1.0, delay - bound))
            self._due = due + cost / self.rate
            if delay > 0:
                self.waiting += 1
        if delay > 0:
            try:
                self._wait(delay)
            finally:
                with self._lock:
                    self.waiting -= 1

    def _wait(self, delay: float) -> None:
        """Sleep until the admission's turn; a caller that went away stops waiting (and is not run)."""
        cancel = cancellation.current()
        if cancel is None:
            self._sleep(delay)
            return
        if cancel.wait(delay):
            raise RequestCancelled("the caller went away while waiting for its turn at the provisioned rate")

    def settle(self, estimated: float, used: float) -> None:
        """Correct an admission's charge to the tokens it really used (refund or extra)."""
        with self._lock:
            self._due = max(self._clock(), self._due + (used - estimated) / self.rate)


_GATES: dict[str, ThroughputGate] = {}
_GATES_LOCK = threading.Lock()


def gate_for(owner: str, rate: float, name: str) -> ThroughputGate:
    """One gate per provisioned entity and rate: a rebuilt backend keeps pacing where it was."""
    with _GATES_LOCK:
        gate = _GATES.get(owner)
        if gate is None or gate.rate != rate:
            gate = _GATES[owner] = ThroughputGate(rate, name)
        return gate


def max_waiters() -> int:
    return int(os.environ.get("SQLINFER_PROVISIONED_MAX_WAITERS", "64"))


# Backends built for each owner and not released yet: a rebuilt backend (a tag or limit changed)
# claims the running engine again, so it keeps its engine and cores instead of restarting.
_CLAIMS: dict[str, int] = {}
_CLAIMS_LOCK = threading.Lock()
RELEASE_GRACE_SECONDS = 5.0


class DedicatedEngineBackend(LocalEngineBackend):
    """A local entity served by an engine of its own, on ``units`` reserved cores."""

    def __init__(self, model: str, task: str, owner: str, units: int, events=None):
        super().__init__(model, task, events=events)
        self.owner, self.units = owner, units
        self._released = False
        with _CLAIMS_LOCK:
            _CLAIMS[owner] = _CLAIMS.get(owner, 0) + 1

    @property
    def engine(self):
        if self._engine is None:
            from engine import reservations
            from engine.throughput import unit_engine_config
            from engine.vllm_engine import dedicated_engine

            cores = reservations.reserve(self.owner, self.units)
            # sized for its units: a batch and KV cache in proportion to its cores
            config = unit_engine_config(self.units)
            self._engine = dedicated_engine(self.model, self.owner, cores, config)
        return self._started(self._engine)

    def close(self) -> None:
        self.release()

    def release(self) -> None:
        """Free the engine and its cores unless a rebuilt backend claims them within a grace period."""
        with _CLAIMS_LOCK:
            if self._released:
                return
            self._released = True
            _CLAIMS[self.owner] = _CLAIMS.get(self.owner, 1) - 1
        timer = threading.Timer(RELEASE_GRACE_SECONDS, _free_if_unclaimed, args=(self.owner,))
        timer.daemon = True
        timer.start()


def _free_if_unclaimed(owner: str) -> None:
    from engine import reservations
    from engine.vllm_engine import close_dedicated

    with _CLAIMS_LOCK:  # held while freeing: a backend built meanwhile waits, then starts afresh
        if _CLAIMS.get(owner, 0) > 0:
            return
        _CLAIMS.pop(owner, None)
        close_dedicated(owner)
        reservations.release(owner)
    with _GATES_LOCK:
        _GATES.pop(owner, None)


class ProvisionedBackend(DelegatingBackend):
    """A provisioned entity's engine behind its throughput gate."""

    def __init__(self, inner: DedicatedEngineBackend, provisioning: Provisioning, name: str):
        super().__init__(inner)
        self.provisioning = provisioning
        self.gate = gate_for(inner.owner, provisioning.tokens_per_second, name)

    def _estimate(self, items: Sequence[Any], kind: str, options: Any) -> float:
        """Prompt tokens plus what each answer may generate (max_tokens, at most the context)."""
        prompts = self.inner.count_tokens(items, kind) or [0] * len(items)
        per_answer = min(options.max_tokens or DEFAULT_MAX_TOKENS, CONTEXT_TOKENS) * (getattr(options, "n", 1) or 1)
        return float(sum(prompts) + len(items) * per_answer)

    def _paced(self, items: Sequence[Any], kind: str, options: Any, call: Callable[[], list[Any]]) -> list[Any]:
        estimated = self._estimate(items, kind, options)
        self.gate.admit(estimated, wait=limit_mode.get() != "refuse")
        used = 0.0
        try:
            results = call()
            used = sum(r.prompt_tokens + getattr(r, "completion_tokens", 0) for r in results)
            return results
        finally:
            self.gate.settle(estimated, used)

    def chat(self, conversations, options, on_result=None):
        return self._paced(conversations, "chat", options, lambda: self.inner.chat(conversations, options, on_result))

    def complete(self, prompts, options, on_result=None):
        return self._paced(prompts, "completions", options, lambda: self.inner.complete(prompts, options, on_result))

    def stream(self, request, options, chat):
        estimated = self._estimate([request], "chat" if chat else "completions", options)
        self.gate.admit(estimated, wait=limit_mode.get() != "refuse")
        last = None
        try:
            for last in self.inner.stream(request, options, chat):
                yield last
        finally:
            self.gate.settle(estimated, (last.prompt_tokens + last.completion_tokens) if last is not None else 0)
