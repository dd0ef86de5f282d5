"""What one model unit is worth on this machine: a measured, cached tokens-per-second figure.

In Databricks, provisioned throughput is sold in chunks of tokens per second
(``throughput_chunk_size``) that depend on the model. Here a model unit is one CPU core running
the model's own engine, so a chunk is what the model's engine processes per second on one core
of *this* machine: prompt and generated tokens of a fixed chat workload (64 short review chats,
32 generated tokens each, greedy), measured once on an engine bound to one core and cached in
``$SQLINFER_HOME/throughput/`` by model directory, CPU model, dtype and vLLM version. A new CPU,
dtype or engine measures again; ``sqlinfer doctor`` and ``get-model-optimization-info`` show it.

Measuring starts a temporary one-core engine (about a minute on a 2-core machine), so it happens
once, when a provisioned entity is deployed or the optimization info is first asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.model_store import resolve_model, sqlinfer_home
from engine.types import SamplingOptions

log = logging.getLogger("sqlinfer.throughput")

WORKLOAD_CHATS = 64
WORKLOAD_TOKENS = 32
_SUBJECTS = ("battery", "screen", "delivery", "price", "support", "size", "sound", "camera")
_MOODS = ("love", "hate", "am unsure about", "returned")
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Measurement:
    model: str
    tokens_per_second: float  # prompt + generated tokens per second, one core
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    cpu_model: str
    dtype: str
    vllm_version: str
    measured_at: float

    @property
    def chunk_size(self) -> int:
        """Tokens per second one model unit buys, as Databricks' ``throughput_chunk_size`` (>= 1)."""
        return max(1, int(self.tokens_per_second))


def workload() -> list[list[dict[str, str]]]:
    """The fixed chats every measurement runs (short review prompts, a shared instruction)."""
    return [[{"role": "user", "content": f"Classify the sentiment of this review as positive or negative: "
                                         f"I {_MOODS[i % 4]} the {_SUBJECTS[i % 8]} of this product (order {i})."}]
            for i in range(WORKLOAD_CHATS)]


def _identity(dtype: str) -> tuple[str, str, str]:
    """What a measurement depends on besides the model: CPU model, dtype, engine build."""
    from engine.hardware import read_cpu_facts
    from engine.report import EngineBuild

    return read_cpu_facts().model_name, dtype, str(EngineBuild.installed())


def _cache_file(model_path: Path, cpu_model: str, dtype: str, vllm_version: str) -> Path:
    key = hashlib.sha256(f"{model_path}|{cpu_model}|{dtype}|{vllm_version}".encode()).hexdigest()[:16]
    return sqlinfer_home() / "throughput" / f"{model_path.name}-{key}.json"


def cached(model: str) -> Measurement | None:
    """The stored measurement of ``model`` on this CPU, dtype and engine, if one was made."""
    from engine.config import EngineConfig

    info = resolve_model(model)
    dtype = EngineConfig.for_this_machine().dtype
    path = _cache_file(info.path, *_identity(dtype))
    try:
        return Measurement(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def measure(model: str) -> Measurement:
    """The model's one-core throughput on this machine: cached, or measured now (once at a time)."""
    with _LOCK:
        found = cached(model)
        if found is not None:
            return found
        return _measure(model)


def unit_engine_config(units: int):
    """Engine settings for ``units`` model units: a batch of 64 and a 0.5 GiB KV cache per unit
    (what the measurement ran with), unless SQLINFER_ENGINE_MAX_NUM_SEQS / _KV_CACHE_GIB say
    otherwise (the user's settings win, as everywhere)."""
    import os

    from engine.config import EngineConfig

    sized = {"max_num_seqs": WORKLOAD_CHATS * units, "kv_cache_gib": 0.5 * units}
    return EngineConfig.for_this_machine(**{field: value for field, value in sized.items()
                                            if f"SQLINFER_ENGINE_{field.upper()}" not in os.environ})


def _measure(model: str) -> Measurement:
    from engine import reservations
    from engine.vllm_engine import close_dedicated, dedicated_engine

    info = resolve_model(model)
    config = unit_engine_config(1)
    cpu_model, dtype, vllm_version = _identity(config.dtype)
    owner = f"throughput measurement of {info.name}"
    # The top core, without moving the shared engines off it for a minute and back (notify=False).
    cores = reservations.reserve(owner, 1, notify=False) if len(reservations.machine_cores()) > 1 \
        else reservations.machine_cores()[:1]
    try:
        engine = dedicated_engine(str(info.path), owner, tuple(cores), config)
        engine.start()
        options = SamplingOptions(temperature=0.0, max_tokens=WORKLOAD_TOKENS)
        engine.chat(workload()[:4], options)  # warm the kernels first
        engine.reset_prefix_cache()
        began = time.perf_counter()
        results = engine.chat(workload(), options)
        seconds = time.perf_counter() - began
    finally:
        close_dedicated(owner)
        reservations.release(owner, notify=False)
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    found = Measurement(info.name, round((prompt + completion) / seconds, 1), prompt, completion, round(seconds, 2),
                        cpu_model, dtype, vllm_version, time.time())
    path = _cache_file(info.path, cpu_model, dtype, vllm_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(found), indent=1))
    log.info("measured %s on one core of %s: %.1f tokens/s (%s)", info.name, cpu_model, found.tokens_per_second, dtype)
    return found
