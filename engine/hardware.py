"""What this machine computes fast, and the engine defaults that follow from it.

Why this module exists: on CPUs the dtype decides the speed, in opposite directions. On a 2-core
AMD EPYC with AVX2 only, bfloat16 is emulated and the engine ran 5.1x slower than in float32; on an
Intel Xeon with AMX, float32 was 3.7x slower than bfloat16. Likewise vLLM's automatic CPU thread
binding keeps one core for its scheduler, which on a 2-core machine halves the compute (measured:
the demo's scoring query took 65.9 s with one bound core and 38.2 s with both). So no dtype or
thread count may be hard-coded: they are chosen here, once, from facts about the hardware.

The facts (:class:`CpuFacts`) are read from ``/proc/cpuinfo``, ``/sys`` and the process's CPU
affinity; the rules (:func:`choose_dtype`, :func:`choose_threads_bind`, :func:`choose_block_size`)
are pure functions of them, so tests can hand them any flag set. Nothing here imports torch or
vLLM; GPU facts come from the caller (``engine.config``), which already has torch loaded.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# x86 flags (as /proc/cpuinfo spells them) that mean bf16 arithmetic in hardware: AVX512-BF16
# (dot products, Intel Cooper Lake+ and AMD Zen 4+) and AMX-BF16 (Intel Sapphire Rapids+).
X86_NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
# aarch64: the BF16 extension (Graviton3, Neoverse V1/N2+) appears as "bf16" in Features.
ARM_NATIVE_BF16 = ("bf16",)
# The features worth showing a user who asks why the engine runs as it does.
SHOWN_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                  "asimd", "sve", "bf16")
# vLLM's CPU attention accepts KV blocks in multiples of 32 (16 is refused: "No common block size
# for 16 (CPU_ATTN: [MultipleOf(32)])"); its CPU default is 128.
CPU_BLOCK_SIZE = 32
# At and above this many physical cores, vLLM's own binding (one core kept for its scheduler
# process) is used as it is; below it, that core is too large a share of the machine.
SMALL_MACHINE_CORES = 8


@dataclass(frozen=True)
class CpuFacts:
    """What the engine's defaults depend on, as read from this machine (or given by a test)."""

    model_name: str
    architecture: str  # platform.machine(): x86_64, aarch64, ...
    flags: frozenset[str]
    cpus: tuple[int, ...]  # logical CPUs this process may run on
    core_cpus: tuple[int, ...]  # one logical CPU per physical core, on the first NUMA node of ``cpus``

    @property
    def native_bf16(self) -> tuple[str, ...]:
        """The flags that give this CPU bf16 arithmetic in hardware (empty: none)."""
        wanted = ARM_NATIVE_BF16 if self.architecture in ("aarch64", "arm64") else X86_NATIVE_BF16
        return tuple(flag for flag in wanted if flag in self.flags)

    @property
    def shown_features(self) -> tuple[str, ...]:
        return tuple(flag for flag in SHOWN_FEATURES if flag in self.flags)

    @classmethod
    def for_test(cls, flags: set[str] | frozenset[str], cores: int = 2, model_name: str = "test CPU",
                 architecture: str = "x86_64") -> "CpuFacts":
        cpus = tuple(range(cores))
        return cls(model_name, architecture, frozenset(flags), cpus, cpus)


@dataclass(frozen=True)
class Choice:
    """A chosen setting and the reason, in words a user can act on."""

    value: str | int | None
    reason: str


def choose_dtype(cpu: CpuFacts) -> Choice:
    """bfloat16 only where the CPU does bf16 arithmetic natively; float32 everywhere else."""
    native = cpu.native_bf16
    if native:
        return Choice("bfloat16", f"{cpu.model_name} has native bf16 ({', '.join(native)}): bfloat16 is fastest there "
                                  f"(float32 measured 3.7x slower on an AMX Xeon)")
    expected = "bf16" if cpu.architecture in ("aarch64", "arm64") else "avx512_bf16 or amx_bf16"
    return Choice("float32", f"{cpu.model_name} has no native bf16 arithmetic (no {expected}), so bfloat16 would be "
                             f"emulated (measured 5.1x slower than float32 on an AVX2-only AMD EPYC)")


def choose_threads_bind(cpu: CpuFacts) -> Choice:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for every engine of the process.

    Every engine gets the same cores: measured on 2 cores with the chat and embedding engines
    both busy, giving each all cores finished together as fast as splitting the cores, and each
    engine alone ran at full speed (splitting halved it). Idle engines use no CPU.
    """
    cores = cpu.core_cpus or cpu.cpus
    if len(cores) >= SMALL_MACHINE_CORES:
        return Choice("auto", f"{len(cores)} physical cores: vLLM's own binding (one core per physical core on "
                              f"the first NUMA node, one kept for its scheduler)")
    listed = _cpu_list(cores)
    return Choice(listed, f"{len(cores)} physical core(s): every engine computes on all of them (CPUs {listed}); "
                          f"vLLM's automatic binding would keep one for its scheduler and leave "
                          f"{max(len(cores) - 1, 1)} to compute (measured 1.7x slower on 2 cores)")


def choose_block_size(cpu: CpuFacts) -> Choice:
    """The KV-cache block: prefixes are reused in whole blocks, so the smallest block vLLM's CPU
    attention accepts lets prompts that share only a short instruction reuse it."""
    return Choice(CPU_BLOCK_SIZE, f"prefixes are cached in whole blocks; {CPU_BLOCK_SIZE} tokens is the smallest "
                                  f"block vLLM's CPU attention accepts (its default is 128; the demo's prompts "
                                  f"share ~60 tokens: 25.4 s with 32 against 38.2 s with 128)")


def _cpu_list(cpus: tuple[int, ...]) -> str:
    """CPU ids as vLLM's bind syntax writes them: ``0-3,8``."""
    ranges: list[str] = []
    ordered = sorted(cpus)
    start = previous = ordered[0]
    for cpu in ordered[1:] + [None]:  # type: ignore[list-item]
        if cpu is not None and cpu == previous + 1:
            previous = cpu
            continue
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        if cpu is not None:
            start = previous = cpu
    return ",".join(ranges)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags from ``/proc/cpuinfo`` text (x86 or ARM)."""
    model_name, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model_name:
            model_name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model_name, flags


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _physical_core_cpus(cpus: tuple[int, ...]) -> tuple[int, ...]:
    """The lowest logical CPU of each physical core among ``cpus``, on the first CPU's NUMA node
    (as vLLM's own binding picks them); ``cpus`` itself where ``/sys`` does not say."""
    root = Path("/sys/devices/system/cpu")
    node_of: dict[int, str] = {}
    for node in Path("/sys/devices/system/node").glob("node[0-9]*"):
        for cpu in _parse_id_list(_read(node / "cpulist") or ""):
            node_of[cpu] = node.name
    first_node = node_of.get(cpus[0])
    seen: dict[tuple[str, str], int] = {}
    for cpu in sorted(cpus):
        if first_node is not None and node_of.get(cpu) != first_node:
            continue
        package = _read(root / f"cpu{cpu}/topology/physical_package_id")
        core = _read(root / f"cpu{cpu}/topology/core_id")
        if package is None or core is None:
            return cpus
        seen.setdefault((package, core), cpu)
    return tuple(sorted(seen.values())) or cpus


def _parse_id_list(text: str) -> list[int]:
    ids: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


@lru_cache(maxsize=1)
def read_cpu_facts() -> CpuFacts:
    """This machine's CPU, read once per process."""
    model_name, flags = parse_cpuinfo(_read(Path("/proc/cpuinfo")) or "")
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cpus = tuple(range(os.cpu_count() or 1))
    return CpuFacts(model_name or platform.processor() or "unknown CPU", platform.machine(), flags, cpus,
                    _physical_core_cpus(cpus))
