"""Provisioned throughput holds under a pay-per-token flood; a pay-per-token endpoint does not.

One ``sqlinfer serve`` process (a fresh home) serves the bundled chat model three ways:

* ``reserved``: a served entity with ``provisioned_model_units: 1``: its own engine on one
  reserved core, admitted at the measured chunk rate;
* ``system-smollm2-135m-instruct``: pay-per-token, the shared engine (moved to the other cores);
* ``unreserved``: the same model without provisioning (the shared engine), the control.

Phases, each ``--seconds`` long, with ``--clients`` callers looping on one endpoint (greedy,
``--max-tokens`` tokens, distinct prompts) while ``--flood`` callers hammer the pay-per-token
endpoint or not (the callers run on the unreserved cores: see ``client_cores``). Reported: tokens/s (prompt + completion, from the answers' usage) of the
measured endpoint alone and under the flood; ``ratio`` = reserved under flood / reserved alone
(target >= 0.8, the issue's "within 20 %"); the control's ratio shows what the reservation buys.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("SQLINFER_RESULT_STORE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.servers import start_server, stop_server  # noqa: E402

CHAT = "system-smollm2-135m-instruct"
_SERIAL = itertools.count()


@dataclass(frozen=True)
class Phase:
    endpoint: str
    flooded: bool
    seconds: float
    requests: int
    tokens: int
    refused: int  # answered with another status than 200 (599: the connection failed)
    statuses: dict[str, int]
    tokens_per_second: float
    flood_tokens_per_second: float


def create_endpoints(url: str, token: str) -> dict:
    """``reserved`` (one model unit) and ``unreserved``; returns the optimization info."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as admin:
        for name, extra in (("reserved", {"provisioned_model_units": 1}), ("unreserved", {})):
            admin.post("/api/2.0/serving-endpoints", json={"name": name, "config": {"served_entities": [
                {"entity_name": "system.ai.smollm2-135m-instruct", **extra}]}}).raise_for_status()
        for name in ("reserved", "unreserved"):
            deadline = time.monotonic() + 600
            while True:
                endpoint = admin.get(f"/api/2.0/serving-endpoints/{name}").json()
                if endpoint["state"]["config_update"] != "IN_PROGRESS":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not deploy")
                time.sleep(0.5)
            if endpoint["state"]["ready"] != "READY":
                raise RuntimeError(f"{name} failed to deploy: {json.dumps(endpoint)}")
        return admin.get("/api/2.0/serving-endpoints/get-model-optimization-info/system.ai.smollm2-135m-instruct/1").json()


def ask(client, endpoint: str, max_tokens: int) -> tuple[int, int]:
    """(status, prompt + completion tokens) of one chat."""
    serial = next(_SERIAL)
    response = client.post(f"/serving-endpoints/{endpoint}/invocations", json={
        "messages": [{"role": "user", "content": f"Request {serial}: write one sentence about product number {serial}."}],
        "max_tokens": max_tokens, "temperature": 0})
    if response.status_code != 200:
        return response.status_code, 0
    usage = response.json()["usage"]
    return 200, usage["prompt_tokens"] + usage["completion_tokens"]


def run_phase(url: str, token: str, endpoint: str, clients: int, flood: int, seconds: float, max_tokens: int) -> Phase:
    import httpx

    stop = threading.Event()
    measured: list[tuple[float, int, int]] = []
    flooded: list[tuple[float, int, int]] = []
    lock = threading.Lock()

    cores = client_cores()

    def loop(target: str, sink: list) -> None:
        os.sched_setaffinity(0, cores)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as client:
            while not stop.is_set():
                try:
                    status, tokens = ask(client, target, max_tokens)
                except httpx.HTTPError:  # counted as a failed request, the loop goes on
                    status, tokens = 599, 0
                with lock:
                    sink.append((time.monotonic(), status, tokens))

    threads = [threading.Thread(target=loop, args=(endpoint, measured), daemon=True) for _ in range(clients)]
    threads += [threading.Thread(target=loop, args=(CHAT, flooded), daemon=True) for _ in range(flood)]
    for thread in threads:
        thread.start()
    time.sleep(min(5.0, seconds / 4))  # let the flood build up before the window opens
    opened = time.monotonic()
    time.sleep(seconds)
    closed = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join(timeout=600)

    def window(rows):
        return [r for r in rows if opened <= r[0] <= closed]

    inside, flood_inside = window(measured), window(flooded)
    tokens = sum(r[2] for r in inside)
    statuses: dict[str, int] = {}
    for row in inside:
        statuses[str(row[1])] = statuses.get(str(row[1]), 0) + 1
    return Phase(endpoint, flood > 0, round(closed - opened, 2), len(inside), tokens,
                 sum(1 for r in inside if r[1] != 200), statuses, round(tokens / (closed - opened), 1),
                 round(sum(r[2] for r in flood_inside) / (closed - opened), 1))


def client_cores() -> set[int]:
    """The load generator's CPUs: all but the last physical core, which the server reserves for
    the provisioned engine (it takes cores from the top). Real clients are on other machines; on
    one machine, callers on the reserved core would measure the load generator, not the server."""
    from engine.reservations import machine_cores

    cores = machine_cores()
    return set(cores[:-1]) if len(cores) > 1 else set(cores)


def cpu_model() -> str:
    from engine.hardware import read_cpu_facts

    return read_cpu_facts().model_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--flood", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        process, url, token = start_server(Path(tmp) / "home")
        try:
            began = time.perf_counter()
            info = create_endpoints(url, token)
            print(f"deployed (chunk measured) in {time.perf_counter() - began:.1f} s: {json.dumps(info)}", flush=True)
            import httpx

            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as warm:
                for name in ("reserved", CHAT):  # start both engines before anything is timed
                    ask(warm, name, 4)
            # the control's "alone" first: after a flood the shared engine on the leftover core
            # was seen to stay slow for a while (see the README)
            order = (("unreserved", 0), ("reserved", 0), ("reserved", args.flood), ("unreserved", args.flood))
            measured = {(endpoint, flood > 0): run_phase(url, token, endpoint, args.clients, flood, args.seconds,
                                                         args.max_tokens) for endpoint, flood in order}
            phases = [measured[("reserved", False)], measured[("reserved", True)],
                      measured[("unreserved", False)], measured[("unreserved", True)]]
        finally:
            stop_server(process)
    for phase in phases:
        print(f"{phase.endpoint:10s} {'under flood' if phase.flooded else 'alone      '}: {phase.tokens_per_second:7.1f} "
              f"tokens/s ({phase.requests} requests, statuses {phase.statuses}; flood {phase.flood_tokens_per_second} tokens/s)")
    reserved_alone, reserved_flood, control_alone, control_flood = phases
    result = {
        "benchmark": "provisioned throughput under a pay-per-token flood",
        "cpu_model": cpu_model(),
        "optimization_info": info,
        "phases": [asdict(p) for p in phases],
        "ratio": round(reserved_flood.tokens_per_second / reserved_alone.tokens_per_second, 3),
        "control_ratio": round(control_flood.tokens_per_second / control_alone.tokens_per_second, 3),
        "target": 0.8,
    }
    print(f"reserved: under flood / alone = {result['ratio']} (target >= 0.8); without provisioning: "
          f"{result['control_ratio']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
