"""Engine settings: CPU defaults that work on a laptop, GPU settings passed straight through.

The CPU defaults come from measurements on the project's 2-core machine (see design.md): vLLM's
default memory fraction of 0.92 fails there, and eager mode starts in ~30 s instead of ~90 s
(no torch.compile). Every field can be overridden, in code or with ``SQLINFER_ENGINE_<FIELD>``
environment variables (e.g. ``SQLINFER_ENGINE_ENFORCE_EAGER=false``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import InvalidParameterValue


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = "bfloat16"
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

    @classmethod
    def from_env(cls, device_defaults: dict[str, Any] | None = None, **overrides: Any) -> "EngineConfig":
        """Defaults, then ``device_defaults``, then ``SQLINFER_ENGINE_*`` variables, then overrides."""
        values: dict[str, Any] = dict(device_defaults or {})
        for name in cls.model_fields:
            raw = os.environ.get(f"SQLINFER_ENGINE_{name.upper()}")
            if raw is None:
                continue
            try:
                values[name] = json.loads(raw)
            except json.JSONDecodeError:
                values[name] = raw
        values.update(overrides)
        try:
            return cls(**values)
        except ValueError as exc:
            raise InvalidParameterValue(f"invalid engine setting: {exc}") from None

    @classmethod
    def for_this_machine(cls) -> "EngineConfig":
        """CPU defaults, or GPU ones when CUDA is available (vLLM's own memory fraction, graphs on)."""
        import torch

        if torch.cuda.is_available():
            return cls.from_env({"gpu_memory_utilization": 0.85, "enforce_eager": False, "dtype": "auto", "kv_cache_gib": None})
        return cls.from_env()

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
        args.update(self.extra_engine_args)
        return args
