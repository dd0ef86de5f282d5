"""Engine settings: defaults chosen for the hardware, then the user's settings on top.

On CPUs the defaults come from ``engine.hardware`` (dtype from the CPU's native arithmetic,
thread binding from its cores, the KV block size vLLM's CPU attention allows); the rest come
from measurements on the project's 2-core machines (see design.md): vLLM's default memory
fraction of 0.92 fails there, and eager mode starts in ~30 s instead of ~90 s (no
torch.compile). On GPUs, vLLM's own choices are passed through.

Every field can be overridden, in code or with ``SQLINFER_ENGINE_<FIELD>`` environment variables
(e.g. ``SQLINFER_ENGINE_DTYPE=bfloat16``); what the user sets always wins over the hardware rule,
and :meth:`EngineConfig.reasons` says where each chosen value came from.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from engine.errors import InvalidParameterValue

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "auto")
# Settings the hardware rule decides; the others have one default everywhere on a device kind.
HARDWARE_FIELDS = ("dtype", "cpu_threads_bind", "block_size")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # float32 when nothing chooses: correct and never pathologically slow on any CPU.
    # for_this_machine() replaces it with the hardware's choice.
    dtype: Dtype = "float32"
    # vLLM's VLLM_CPU_OMP_THREADS_BIND for the engine's worker ("0-3", "auto", "nobind");
    # None: vLLM's own default. A VLLM_CPU_OMP_THREADS_BIND the user exported wins over it.
    cpu_threads_bind: str | None = None
    # KV-cache block in tokens (prefixes are reused in whole blocks); None: vLLM's default.
    block_size: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float = Field(default=0.4, gt=0.0, le=1.0)
    # On CPU, vLLM reserves gpu_memory_utilization x the NUMA node's memory (~7 GB resident per
    # chat engine here) and refuses to start when that much is not free, so a second process with
    # an engine fails at random. A fixed KV cache is small and predictable: 2 GiB holds ~90k
    # tokens of SmolLM2-135M. None: size it from gpu_memory_utilization (the GPU default).
    kv_cache_gib: float | None = Field(default=2.0, gt=0.0)
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    max_model_len: int | None = Field(default=2048, ge=16)
    max_num_seqs: int | None = Field(default=256, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    seed: int = 0
    extra_engine_args: dict[str, Any] = Field(default_factory=dict)

    # field -> why it has its value ("set by SQLINFER_ENGINE_DTYPE", the hardware rule's reason)
    _reasons: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    def from_env(cls, device_defaults: dict[str, Any] | None = None, reasons: dict[str, str] | None = None,
                 **overrides: Any) -> "EngineConfig":
        """Defaults, then ``device_defaults``, then ``SQLINFER_ENGINE_*`` variables, then overrides."""
        values: dict[str, Any] = dict(device_defaults or {})
        why = dict(reasons or {})
        origin: dict[str, str] = {}
        for name in cls.model_fields:
            variable = f"SQLINFER_ENGINE_{name.upper()}"
            raw = os.environ.get(variable)
            if raw is None:
                continue
            try:
                values[name] = json.loads(raw)
            except json.JSONDecodeError:
                values[name] = raw
            origin[name] = variable
            why[name] = f"set by {variable}"
        for name in overrides:
            origin[name] = f"{name}= in code"
            why[name] = "set in code"
        values.update(overrides)
        try:
            config = cls(**values)
        except ValidationError as exc:
            raise _setting_error(exc, origin) from None
        config._reasons.update(why)
        return config

    @classmethod
    def for_this_machine(cls, **overrides: Any) -> "EngineConfig":
        """GPU settings when CUDA is available, else CPU defaults chosen from this CPU's features."""
        import torch

        if torch.cuda.is_available():
            gpu = {"gpu_memory_utilization": 0.85, "enforce_eager": False, "dtype": "auto", "kv_cache_gib": None}
            reasons = {"dtype": f"GPU {torch.cuda.get_device_name(0)}: vLLM picks the model's dtype (bf16 where the "
                                f"GPU supports it)"}
            return cls.from_env(gpu, reasons, **overrides)
        values, reasons = cpu_defaults()
        return cls.from_env(values, reasons, **overrides)

    def reasons(self) -> dict[str, str]:
        """Why the hardware-dependent settings have their values (empty for a bare EngineConfig())."""
        return dict(self._reasons)

    def engine_args(self, model_path: str, runner: str) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``AsyncEngineArgs``."""
        args: dict[str, Any] = {
            "model": model_path,
            "runner": runner,
            "dtype": self.dtype,
            # Embedding models need next to no KV cache; keep them from reserving a chat's share.
            "gpu_memory_utilization": self.gpu_memory_utilization if runner == "generate" else min(self.gpu_memory_utilization, 0.1),
            "enforce_eager": self.enforce_eager,
            # vLLM refuses prefix caching for encoder-only (embedding) models: no cacheable group.
            "enable_prefix_caching": self.enable_prefix_caching and runner == "generate",
            "tensor_parallel_size": self.tensor_parallel_size,
            "seed": self.seed,
            "disable_log_stats": True,
        }
        if self.kv_cache_gib is not None:
            gib = self.kv_cache_gib if runner == "generate" else min(self.kv_cache_gib, 0.25)
            args["kv_cache_memory_bytes"] = int(gib * 1024**3)
        if self.max_model_len is not None and runner == "generate":
            # Encoders (embeddings) keep their own, shorter, position limit.
            args["max_model_len"] = self.max_model_len
        if self.max_num_seqs is not None:
            args["max_num_seqs"] = self.max_num_seqs
        if self.block_size is not None and runner == "generate":
            args["block_size"] = self.block_size
        args.update(self.extra_engine_args)
        return args

    def process_env(self) -> dict[str, str]:
        """Environment the engine's child processes need (vLLM reads its CPU binding there)."""
        if self.cpu_threads_bind is None or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
            return {}
        return {"VLLM_CPU_OMP_THREADS_BIND": self.cpu_threads_bind}


def cpu_defaults() -> tuple[dict[str, Any], dict[str, str]]:
    """The hardware rule applied to this CPU: settings, and the reason for each."""
    from engine.hardware import choose_block_size, choose_dtype, choose_threads_bind, read_cpu_facts

    cpu = read_cpu_facts()
    choices = {"dtype": choose_dtype(cpu), "cpu_threads_bind": choose_threads_bind(cpu),
               "block_size": choose_block_size(cpu)}
    return {k: c.value for k, c in choices.items()}, {k: c.reason for k, c in choices.items()}


def _setting_error(exc: ValidationError, origin: dict[str, str]) -> InvalidParameterValue:
    """One engine-setting error naming where the bad value came from and what is allowed."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        source = origin.get(field, f"engine setting {field!r}")
        allowed = f"; allowed values: {', '.join(DTYPES)}" if field == "dtype" else ""
        shown = error.get("input")
        problems.append(f"{source} = {shown!r} is invalid: {error['msg']}{allowed}")
    return InvalidParameterValue("invalid engine setting: " + "; ".join(problems))
