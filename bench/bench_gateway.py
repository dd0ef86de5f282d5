"""Gateway overhead and external batch dispatch, each against its baseline in the same run.

1. **Overhead**: ``POST /serving-endpoints/{name}/invocations`` through ``sqlinfer serve`` (auth,
   permission check, rate-limit-free route, usage row, provider call) against calling the same
   fast loopback upstream directly. Latency is measured one request at a time (p50/p99); saturation
   throughput with 32 concurrent clients. Targets: p50 overhead <= 2 ms, >= 1,000 requests/s.
2. **Dispatch**: 2,000 prompts through the serving client (``OpenAICompatibleBackend``, concurrency
   64) to an upstream that takes 50 ms per request, against the ideal 64 / 0.05 s = 1,280/s.
   Target >= 90%. Then 400 prompts under a 300-calls-per-minute limit: the upstream's per-minute
   arrivals must never exceed 300.

Everything runs on this machine's loopback; upstreams and the server are separate processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

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


async def saturate(url: str, headers: dict, total: int, concurrency: int) -> float:
    async with httpx.AsyncClient(headers=headers, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        queue = list(range(total))

        async def worker():
            while queue:
                queue.pop()
                (await client.post(url, json=CHAT)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_overhead() -> dict:
    from serving.endpoints import EndpointService

    up, up_url = upstream(0)
    home = Path(tempfile.mkdtemp(prefix="sqlinfer-bench-"))
    service = EndpointService(home)
    _, token = service.auth.create_token("bench", is_admin=True)
    service.create({"name": "fast", "config": {"served_entities": [{"external_model": {
        "name": "bench", "provider": "custom", "task": "llm/v1/chat",
        "custom_provider_config": {"custom_provider_url": f"{up_url}/v1"}}}]}})
    service.wait_for_deployments()
    port = free_port()
    server = start([sys.executable, "-m", "connectors.cli", "serve", "--port", str(port), "--log-level", "warning"],
                   f"http://127.0.0.1:{port}/health", env=os.environ | {"SQLINFER_HOME": str(home)})
    try:
        direct_url, gateway_url = f"{up_url}/v1/chat/completions", f"http://127.0.0.1:{port}/serving-endpoints/fast/invocations"
        auth = {"Authorization": f"Bearer {token}"}
        direct = sequential_latencies(direct_url, {}, 500)
        through = sequential_latencies(gateway_url, auth, 500)
        direct_rps = asyncio.run(saturate(direct_url, {}, 3000, 32))
        gateway_rps = asyncio.run(saturate(gateway_url, auth, 3000, 32))
    finally:
        server.terminate(), up.terminate()
        server.wait(), up.wait()
    return {"direct_p50_ms": statistics.median(direct), "direct_p99_ms": percentile(direct, 0.99),
            "gateway_p50_ms": statistics.median(through), "gateway_p99_ms": percentile(through, 0.99),
            "p50_overhead_ms": statistics.median(through) - statistics.median(direct),
            "direct_rps": direct_rps, "gateway_rps": gateway_rps}


def bench_dispatch() -> dict:
    from engine.types import SamplingOptions
    from serving.db import Database
    from serving.limits import Limit, RateLimitedBackend, RateLimiter
    from serving.providers import OpenAICompatibleBackend

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
    print("gateway overhead (one fast loopback upstream, 500 sequential + 3000 at concurrency 32):")
    print(f"  direct : p50 {overhead['direct_p50_ms']:.2f} ms  p99 {overhead['direct_p99_ms']:.2f} ms  {overhead['direct_rps']:.0f} req/s")
    print(f"  gateway: p50 {overhead['gateway_p50_ms']:.2f} ms  p99 {overhead['gateway_p99_ms']:.2f} ms  {overhead['gateway_rps']:.0f} req/s")
    verdict = lambda ok: "meets" if ok else "MISSES"  # noqa: E731
    print(f"  p50 overhead {overhead['p50_overhead_ms']:.2f} ms ({verdict(overhead['p50_overhead_ms'] <= 2)} target <= 2 ms); "
          f"throughput ratio gateway/direct {overhead['gateway_rps'] / overhead['direct_rps']:.2f}; "
          f"{overhead['gateway_rps']:.0f} req/s ({verdict(overhead['gateway_rps'] >= 1000)} target >= 1000)")
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
