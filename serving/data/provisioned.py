"""Provisioned throughput for local entities: an engine on cores of its own, admitted at its rate.

A served entity with ``provisioned_model_units`` (or ``min/max_provisioned_throughput``, in
multiples of the model's measured ``throughput_chunk_size``, see ``engine.throughput``) gets:

* **its own engine**, bound to one reserved CPU core per model unit (``engine.reservations``),
  with a KV cache and batch size sized for its units; the shared pay-per-token engines move to
  the other cores, so a flood of pay-per-token requests cannot take its compute;
* **admission at its rate**: a :class:`ThroughputGate` paces requests so that the tokens they
  cost (prompt + ``max_tokens`` when admitted, corrected to the tokens really used when they
  finish) flow at the provisioned tokens per second, with one second of burst. Requests beyond
  the rate queue for up to ``SQLINFER_PROVISIONED_QUEUE_SECONDS`` (default 30); beyond that a REST
  caller gets ``429 REQUEST_LIMIT_EXCEEDED`` with ``Retry-After``, and SQL batches wait.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from serving.data.backends import DelegatingBackend, LocalEngineBackend
from serving.data.limits import limit_mode
from serving.errors import RequestLimitExceeded

BURST_SECONDS = 1.0
DEFAULT_MAX_TOKENS = 256  # what a request without max_tokens is assumed to cost until it finishes


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
    turn is more than the queue bound away)."""

    def __init__(self, rate: float, name: str, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate, self.name = float(rate), name
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._due = 0.0  # when the work admitted so far is done at the rate (the theoretical arrival time)

    def admit(self, cost: float, wait: bool) -> None:
        with self._lock:
            now = self._clock()
            due = max(self._due, now)
            delay = max(0.0, due - now - BURST_SECONDS)
            bound = queue_seconds()
            if delay > bound and not wait:
                raise RequestLimitExceeded(
                    f"endpoint {self.name!r} is provisioned for {self.rate:.0f} tokens/s and its queue is full "
                    f"({delay:.0f} s of admitted work ahead, the bound is {bound:.0f} s); retry in "
                    f"{delay - bound:.0f} s or provision more model units", retry_after_seconds=max(1.0, delay - bound))
            self._due = due + cost / self.rate
        if delay > 0:
            self._sleep(delay)

    def settle(self, estimated: float, used: float) -> None:
        """Give back what an admission was charged beyond the tokens it really used."""
        if estimated > used:
            with self._lock:
                self._due = max(self._clock(), self._due - (estimated - used) / self.rate)


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
            from engine.config import EngineConfig
            from engine.vllm_engine import dedicated_engine

            cores = reservations.reserve(self.owner, self.units)
            # sized for its units: a batch and KV cache in proportion to its cores
            config = EngineConfig.for_this_machine(max_num_seqs=64 * self.units, kv_cache_gib=0.5 * self.units)
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
    with _CLAIMS_LOCK:
        if _CLAIMS.get(owner, 0) > 0:
            return
        _CLAIMS.pop(owner, None)
    from engine import reservations
    from engine.vllm_engine import close_dedicated

    close_dedicated(owner)
    reservations.release(owner)


class ProvisionedBackend(DelegatingBackend):
    """A provisioned entity's engine behind its throughput gate."""

    def __init__(self, inner: LocalEngineBackend, provisioning: Provisioning, name: str):
        super().__init__(inner)
        self.provisioning = provisioning
        self.gate = ThroughputGate(provisioning.tokens_per_second, name)

    def _paced(self, items: Sequence[Any], kind: str, max_tokens: int | None, call: Callable[[], list[Any]]) -> list[Any]:
        prompts = self.inner.count_tokens(items, kind) or [0] * len(items)
        estimated = sum(prompts) + len(items) * (max_tokens or DEFAULT_MAX_TOKENS)
        self.gate.admit(estimated, wait=limit_mode.get() != "refuse")
        results = call()
        used = sum(r.prompt_tokens + getattr(r, "completion_tokens", 0) for r in results)
        self.gate.settle(estimated, used)
        return results

    def chat(self, conversations, options, on_result=None):
        return self._paced(conversations, "chat", options.max_tokens,
                           lambda: self.inner.chat(conversations, options, on_result))

    def complete(self, prompts, options, on_result=None):
        return self._paced(prompts, "completions", options.max_tokens,
                           lambda: self.inner.complete(prompts, options, on_result))

    def stream(self, request, options, chat):
        kind = "chat" if chat else "completions"
        estimated = sum(self.inner.count_tokens([request], kind) or [0]) + (options.max_tokens or DEFAULT_MAX_TOKENS)
        self.gate.admit(estimated, wait=limit_mode.get() != "refuse")
        last = None
        try:
            for last in self.inner.stream(request, options, chat):
                yield last
        finally:
            self.gate.settle(estimated, (last.prompt_tokens + last.completion_tokens) if last is not None else 0)
