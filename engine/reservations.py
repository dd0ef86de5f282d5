"""CPU cores reserved for provisioned engines, and the cores everything else computes on.

Provisioned throughput is reserved capacity. On a CPU machine the capacity an engine has is the
cores its threads are bound to, so a provisioned entity's engine gets cores of its own (one per
model unit) and the shared engines (pay-per-token, the ``system-*`` endpoints) are bound to the
rest. One core always stays unreserved, so pay-per-token traffic is slowed by provisioning,
never shut out. Reservations are per process: the server process that holds the engines.

Binding the engines' compute threads is not all: the server's own threads (HTTP, the shared
engines' front ends and scheduler processes) would still run on the reserved cores under a
flood. So the whole server process is kept on the unreserved cores, except each dedicated
engine's loop thread, which runs on (and spawns its engine processes on) the engine's own cores.
(The other half of the isolation is in the REST layer: queries to a provisioned endpoint wait on
threads of their own, ``serving.api.queries.query_threads``.)
"""

from __future__ import annotations

import os
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


def reserve(owner: str, count: int, notify: bool = True) -> tuple[int, ...]:
    """``count`` cores for ``owner`` (the same ones again if it holds them), taken from the top.
    ``notify=False`` leaves the shared engines and this process where they are (a short-lived
    reservation, such as a throughput measurement, is not worth restarting them twice)."""
    with _LOCK:
        held = _RESERVED.get(owner)
        if held is not None and len(held) == count:
            return held
        cores = machine_cores()
        # the owner's own cores count as free for its new size; nothing changes unless it fits
        taken = {core for other, cores_of in _RESERVED.items() if other != owner for core in cores_of}
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
        listeners = list(_LISTENERS) if notify else []
    for listener in listeners:
        listener()
    return chosen


def release(owner: str, notify: bool = True) -> None:
    with _LOCK:
        found = _RESERVED.pop(owner, None)
        listeners = list(_LISTENERS) if notify else []
    if found is not None:
        for listener in listeners:
            listener()


def on_change(listener) -> None:
    """Call ``listener()`` after every reservation change (from the thread that made it)."""
    with _LOCK:
        _LISTENERS.append(listener)


_STARTING_AFFINITY = frozenset(os.sched_getaffinity(0))
# Threads of this process that serve a dedicated engine (its event loop): they stay on its cores.
_DEDICATED_THREADS: dict[int, tuple[int, ...]] = {}


def pin_this_thread(cores: tuple[int, ...]) -> None:
    """Run the calling thread (a dedicated engine's loop) on ``cores``; the engine processes it
    spawns inherit them, so the engine's scheduler shares its reserved cores, not the flood's."""
    import threading

    os.sched_setaffinity(0, cores)
    with _LOCK:
        _DEDICATED_THREADS[threading.get_native_id()] = tuple(cores)


def unpin_thread(native_id: int) -> None:
    with _LOCK:
        _DEDICATED_THREADS.pop(native_id, None)


def keep_this_process_off_reserved_cores() -> None:
    """Every other thread of this process (HTTP handlers, shared engines' loops, their future
    processes) runs on the unreserved cores, or on all cores again when nothing is reserved.

    Affinity is per thread on Linux and new threads inherit their creator's, so setting it on
    every thread now covers the threads they start later too.
    """
    current = split()
    reserved = {cpu for cores in current.reserved.values() for cpu in cores}
    # Every CPU the process started with (hyperthread siblings and other NUMA nodes included, not
    # only the one-per-core list engines are bound from), minus the reserved ones.
    target = (_STARTING_AFFINITY - reserved) or _STARTING_AFFINITY
    with _LOCK:
        exempt = dict(_DEDICATED_THREADS)
    for entry in os.scandir("/proc/self/task"):
        tid = int(entry.name)
        if tid in exempt:
            continue
        try:
            os.sched_setaffinity(tid, target)
        except OSError:  # the thread ended meanwhile
            pass


def free_units() -> int:
    """How many more model units (cores) a provisioned entity could reserve now."""
    current = split()
    return max(len(current.shared) - 1, 0)
