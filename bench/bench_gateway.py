"""Gateway overhead and external batch dispatch, each against its baseline in the same run.

1. **Overhead**: ``POST /serving-endpoints/{name}/invocations`` through ``sqlinfer serve`` (auth,
   permission check, rate-limit-free route, usage row, provider call) against calling the same
   fast loopback upstream directly. Latency is measured one request at a time (p50/p99); saturation
   throughput with 32 concurrent connections from ``bench/loadgen.py`` (a raw-socket client: httpx
   itself tops out near 400 requests/s on two cores), for ``serve`` with 1 and 2 worker processes.
   Targets: p50 overhead <= 2 ms, >= 1,000 requests/s.
2. **Dispatch**: 2,000 prompts through the serving client (``OpenAICompatibleBackend``, concurrency
   64) to an upstream that takes 50 ms per request, against the ideal 64 / 0.05 s = 1,280/s.
   Target >= 90%. Then 400 prompts under a 300-calls-per-minute limit: the upstream's per-minute
   arrivals must never exceed 300.

Everything runs on this machine's loopback; upstreams and the server are separate processes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# Benchmarks measure the engine and the functions, not the result store: every round computes.
os.environ.setdefault("SQLINFER_RESULT_STORE", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rest_server import free_port  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def start(command: list[str], health: str, env: dict | None = None) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(health, timeout=1)
            return process
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{command} did not start")
            time.sleep(0.2)


def upstream(latency_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = start([sys.executable, str(ROOT / "bench" / "upstream.py"), str(port), str(latency_ms)], f"http://127.0.0.1:{port}/stats")
    return process, f"http://127.0.0.1:{port}"


def sequential_latencies(url: str, headers: dict, count: int) -> list[float]:
    with httpx.Client(headers=headers, timeout=30) as client:
        for _ in range(50):  # warm connections and caches
            client.post(url, json=CHAT)
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            response = client.post(url, json=CHAT)
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
    return latencies


def saturate(url: str, token: str | None, total: int, concurrency: int) -> float:
    """Requests/s from bench/loadgen.py in its own process (httpx itself saturates at ~400/s here)."""
    command = [sys.executable, str(ROOT / "bench" / "loadgen.py"), url, str(total), str(concurrency)] + ([token] if token else [])
    for run in (command[:3] + ["300"] + command[4:], command):  # a warm-up round, then the measured one
        finished = subprocess.run(run, capture_output=True, text=True)
        if finished.returncode:
            raise RuntimeError(f"the load generator failed against {url}: {finished.stderr[-2000:]}")
    answer = json.loads(finished.stdout)
    if answer["errors"]:
        raise RuntimeError(f"{answer['errors']} of {total} requests to {url} failed")
    return answer["rps"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fast_endpoint_home(up_url: str) -> tuple[Path, str]:
    """A new SQLINFER_HOME with the endpoint ``fast`` on the upstream at ``up_url``, and an admin token."""
    from serving.control.service import EndpointService

    home = Path(tempfile.mkdtemp(prefix="sqlinfer-bench-"))
    service = EndpointService(home)
    _, token = service.auth.create_token("bench", is_admin=True)
    service.create({"name": "fast", "config": {"served_entities": [{"external_model": {
        "name": "bench", "provider": "custom", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": f"{up_url}/v1"}}}]}})
    service.wait_for_deployments()
    return home, token


def bench_overhead() -> dict:
    up, up_url = upstream(0)
    home, token = fast_endpoint_home(up_url)
    direct_url = f"{up_url}/v1/chat/completions"
    results: dict = {}
    try:
        for workers in (1, 2):
            port = free_port()
            server = start([sys.executable, "-m", "connectors.cli", "serve", "--port", str(port), "--log-level", "warning",
                            "--workers", str(workers)], f"http://127.0.0.1:{port}/health", env=os.environ | {"SQLINFER_HOME": str(home)})
            gateway_url = f"http://127.0.0.1:{port}/serving-endpoints/fast/invocations"
            try:
                if workers == 1:  # latency: one request at a time, alternating direct and gateway rounds
                    direct, through = [], []
                    for _ in range(3):
                        direct += sequential_latencies(direct_url, {}, 200)
                        through += sequential_latencies(gateway_url, {"Authorization": f"Bearer {token}"}, 200)
                    results |= {"direct_p50_ms": statistics.median(direct), "direct_p99_ms": percentile(direct, 0.99),
                                "gateway_p50_ms": statistics.median(through), "gateway_p99_ms": percentile(through, 0.99),
                                "p50_overhead_ms": statistics.median(through) - statistics.median(direct),
                                "direct_rps": saturate(direct_url, None, 5000, 32)}
                results[f"gateway_rps_{workers}_workers"] = saturate(gateway_url, token, 5000, 32)
            finally:
                server.terminate()
                server.wait()
    finally:
        up.terminate()
        up.wait()
    results["gateway_rps"] = max(results["gateway_rps_1_workers"], results["gateway_rps_2_workers"])
    return results


def bench_dispatch() -> dict:
    from engine.types import SamplingOptions
    from serving.control.db import Database
    from serving.data.limits import Limit, RateLimitedBackend, RateLimiter
    from serving.data.providers import OpenAICompatibleBackend

    up, up_url = upstream(50)
    try:
        backend = OpenAICompatibleBackend("llm/v1/chat", "bench", f"{up_url}/v1", lambda: "unused", max_concurrency=64)
        prompts = [[{"role": "user", "content": f"prompt {i}"}] for i in range(2000)]
        backend.chat(prompts[:128], SamplingOptions(max_tokens=1))  # warm the connection pool
        started = time.perf_counter()
        results = backend.chat(prompts, SamplingOptions(max_tokens=1))
        rps = len(prompts) / (time.perf_counter() - started)
        assert all(r.error is None for r in results)

        db = Database(Path(tempfile.mkdtemp(prefix="sqlinfer-bench-")) / "registry.db")
        limited = RateLimitedBackend(backend, RateLimiter(db), "bench", "bench", [Limit(calls=300, tokens=None, key="endpoint")])
        before = json.loads(httpx.get(f"{up_url}/stats").text)
        started = time.perf_counter()
        limited.chat(prompts[:400], SamplingOptions(max_tokens=1))
        limited_seconds = time.perf_counter() - started
        after = json.loads(httpx.get(f"{up_url}/stats").text)
    finally:
        up.terminate()
        up.wait()
    per_minute: dict[int, int] = {}
    for second, count in after.items():
        arrived = count - before.get(second, 0)
        per_minute[int(second) // 60] = per_minute.get(int(second) // 60, 0) + arrived
    return {"dispatch_rps": rps, "ideal_rps": 64 / 0.05, "limited_seconds": limited_seconds,
            "max_calls_in_a_minute": max(per_minute.values()), "limit_per_minute": 300}


def main() -> int:
    overhead = bench_overhead()
    print("gateway overhead (one fast loopback upstream; 600 sequential requests; 5000 at concurrency 32 from bench/loadgen.py):")
    print(f"  direct : p50 {overhead['direct_p50_ms']:.2f} ms  p99 {overhead['direct_p99_ms']:.2f} ms  {overhead['direct_rps']:.0f} req/s")
    print(f"  gateway: p50 {overhead['gateway_p50_ms']:.2f} ms  p99 {overhead['gateway_p99_ms']:.2f} ms  "
          f"{overhead['gateway_rps_1_workers']:.0f} req/s (1 process), {overhead['gateway_rps_2_workers']:.0f} req/s (serve --workers 2)")
    verdict = lambda ok: "meets" if ok else "MISSES"  # noqa: E731
    print(f"  p50 overhead {overhead['p50_overhead_ms']:.2f} ms ({verdict(overhead['p50_overhead_ms'] <= 2)} target <= 2 ms); "
          f"best {overhead['gateway_rps']:.0f} req/s ({verdict(overhead['gateway_rps'] >= 1000)} target >= 1000)")
    dispatch = bench_dispatch()
    ratio = dispatch["dispatch_rps"] / dispatch["ideal_rps"]
    print("external batch dispatch (2000 prompts, concurrency 64, upstream 50 ms):")
    print(f"  {dispatch['dispatch_rps']:.0f} req/s = {ratio:.2f} of the ideal {dispatch['ideal_rps']:.0f} ({verdict(ratio >= 0.9)} target >= 0.90)")
    print(f"  under a 300/minute limit: 400 prompts in {dispatch['limited_seconds']:.1f} s, at most "
          f"{dispatch['max_calls_in_a_minute']} calls in any minute ({verdict(dispatch['max_calls_in_a_minute'] <= 300)} the limit)")
    results = {"benchmark": "gateway overhead + dispatch", "ratio": ratio, "target": 0.9, **overhead, **dispatch}
    if len(sys.argv) > 2 and sys.argv[1] == "--json":
        Path(sys.argv[2]).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
