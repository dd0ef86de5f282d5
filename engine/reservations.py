"""CPU cores reserved for provisioned engines, and the cores everything else computes on.

Provisioned throughput is reserved capacity. On a CPU machine the capacity an engine has is the
cores its threads are bound to, so a provisioned entity's engine gets cores of its own (one per
model unit) and the shared engines (pay-per-token, the ``system-*`` endpoints) are bound to the
rest. One core always stays unreserved, so pay-per-token traffic is slowed by provisioning,
never shut out. Reservations are per process: the server process that holds the engines.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from engine.errors import ResourceExhausted

_LOCK = threading.Lock()
_RESERVED: dict[str, tuple[int, ...]] = {}  # owner (a served entity) -> its cores
_LISTENERS: list = []  # called after every change (shared engines rebind)


@dataclass(frozen=True)
class CoreSplit:
    """Which physical cores (one logical CPU each) are whose."""

    all_cores: tuple[int, ...]
    reserved: dict[str, tuple[int, ...]]

    @property
    def shared(self) -> tuple[int, ...]:
        taken = {core for cores in self.reserved.values() for core in cores}
        return tuple(core for core in self.all_cores if core not in taken)


def machine_cores() -> tuple[int, ...]:
    from engine.hardware import read_cpu_facts

    cpu = read_cpu_facts()
    return cpu.core_cpus or cpu.cpus


def split() -> CoreSplit:
    with _LOCK:
        return CoreSplit(machine_cores(), dict(_RESERVED))


def reserve(owner: str, count: int) -> tuple[int, ...]:
    """``count`` cores for ``owner`` (the same ones again if it holds them), taken from the top."""
    with _LOCK:
        held = _RESERVED.get(owner)
        if held is not None and len(held) == count:
            return held
        _RESERVED.pop(owner, None)
        cores = machine_cores()
        taken = {core for cores_of in _RESERVED.values() for core in cores_of}
        free = [core for core in cores if core not in taken]
        if count < 1 or count > len(free) - 1:
            others = len(taken)
            raise ResourceExhausted(
                f"{owner} needs {count} model unit(s), one CPU core each, but this machine has {len(cores)} "
                f"core(s), {others} reserved by other provisioned entities and one kept for pay-per-token "
                f"traffic: at most {max(len(free) - 1, 0)} unit(s) are free; lower provisioned_model_units "
                f"(or max_provisioned_throughput) or release another provisioned endpoint")
        chosen = tuple(sorted(free[-count:]))
        _RESERVED[owner] = chosen
        listeners = list(_LISTENERS)
    for listener in listeners:
        listener()
    return chosen


def release(owner: str) -> None:
    with _LOCK:
        found = _RESERVED.pop(owner, None)
        listeners = list(_LISTENERS)
    if found is not None:
        for listener in listeners:
            listener()


def on_change(listener) -> None:
    """Call ``listener()`` after every reservation change (from the thread that made it)."""
    with _LOCK:
        _LISTENERS.append(listener)


def free_units() -> int:
    """How many more model units (cores) a provisioned entity could reserve now."""
    current = split()
    return max(len(current.shared) - 1, 0)
