"""Provisioned throughput: the gate's pacing, core reservations, and (slow) a real server whose
provisioned endpoint keeps its throughput under a pay-per-token flood."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine import reservations
from serving.data.provisioned import BURST_SECONDS, ThroughputGate
from serving.errors import RequestLimitExceeded


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 3))
        self.now += seconds


def test_the_gate_paces_work_to_its_rate_after_one_second_of_burst(monkeypatch):
    monkeypatch.setenv("SQLINFER_PROVISIONED_QUEUE_SECONDS", "30")
    clock = FakeClock()
    gate = ThroughputGate(100, "pt", clock=clock, sleep=clock.sleep)
    for _ in range(4):  # 4 x 50 tokens at 100 tokens/s: 2 s of work, the first second is burst
        gate.admit(50, wait=False)
    assert clock.slept == [0.5]  # the 4th starts when 1.5 s of work is ahead: 0.5 s past the burst
    gate.admit(100, wait=False)  # 1.5 s ahead after that sleep: waits 0.5 s, then 2 s are ahead
    gate.admit(10, wait=False)
    assert clock.slept == [0.5, 0.5, 1.0]


def test_the_gate_refuses_beyond_its_queue_with_retry_after_and_refunds_unused_tokens(monkeypatch):
    monkeypatch.setenv("SQLINFER_PROVISIONED_QUEUE_SECONDS", "2")
    clock = FakeClock()
    gate = ThroughputGate(100, "pt", clock=clock, sleep=lambda s: None)
    gate.admit(400, wait=False)  # 4 s of work ahead from now
    with pytest.raises(RequestLimitExceeded) as refused:
        gate.admit(10, wait=False)
    assert "provisioned for 100 tokens/s and its queue is full" in refused.value.message
    assert refused.value.retry_after_seconds == pytest.approx(4 - BURST_SECONDS - 2)
    gate.admit(10, wait=True)  # SQL batches wait instead
    gate.settle(estimated=400, used=100)  # the first used 100 of the 400 it was charged
    gate.admit(10, wait=False)  # 3 s came back: within the queue again


def test_reservations_keep_one_core_for_pay_per_token_and_say_how_many_are_free(monkeypatch):
    monkeypatch.setattr(reservations, "machine_cores", lambda: (0, 1, 2, 3))
    try:
        assert reservations.reserve("a", 2) == (2, 3)
        assert reservations.split().shared == (0, 1)
        with pytest.raises(reservations.ResourceExhausted) as refused:
            reservations.reserve("b", 2)
        assert "this machine has 4 core(s), 2 reserved by other provisioned entities" in refused.value.message
        assert "at most 1 unit(s) are free" in refused.value.message
        assert reservations.reserve("b", 1) == (1,)
        assert reservations.free_units() == 0
    finally:
        reservations.release("a")
        reservations.release("b")
    assert reservations.split().reserved == {}


# -- a real server: measurement, deployment, the flood --------------------------------------------


@pytest.fixture(scope="module")
def provisioned_server(tmp_path_factory):
    from bench.bench_provisioned import create_endpoints, start_server, stop_server

    home = tmp_path_factory.mktemp("provisioned") / "home"
    process, url, token = start_server(home)
    try:
        info = create_endpoints(url, token)
        yield url, token, home, info
    finally:
        stop_server(process)


@pytest.mark.slow
@pytest.mark.engine
def test_optimization_info_is_measured_on_this_machine_and_cached(provisioned_server):
    url, token, home, info = provisioned_server
    [cached] = list((home / "throughput").glob("*.json"))
    measured = json.loads(cached.read_text())
    assert info["optimizable"] is True and info["throughput_chunk_size"] == int(measured["tokens_per_second"])
    assert info["measurement"]["cpu_model"] == measured["cpu_model"]
    assert measured["completion_tokens"] > 0 and measured["prompt_tokens"] > 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as admin:
        again = admin.get("/api/2.0/serving-endpoints/get-model-optimization-info/system.ai.smollm2-135m-instruct/1")
        assert again.json() == info  # from the cache, not measured again
        logs = admin.get("/api/2.0/serving-endpoints/reserved/served-models/smollm2-135m-instruct/build-logs").json()
        assert f"throughput_chunk_size {info['throughput_chunk_size']} tokens/s per model unit" in logs["logs"]
        chunk = info["throughput_chunk_size"]
        odd = admin.post("/api/2.0/serving-endpoints", json={"name": "odd", "config": {"served_entities": [
            {"entity_name": "system.ai.smollm2-135m-instruct", "min_provisioned_throughput": 0,
             "max_provisioned_throughput": chunk + 1}]}})
        assert odd.status_code == 400 and f"= {chunk + 1} must be a multiple of {chunk}" in odd.json()["message"]
        cores = len(reservations.machine_cores())
        admin.post("/api/2.0/serving-endpoints", json={"name": "too-big", "config": {"served_entities": [
            {"entity_name": "system.ai.smollm2-135m-instruct", "provisioned_model_units": cores}]}}).raise_for_status()
        from tests.registry_helpers import wait_until_settled

        failed = wait_until_settled(admin, "too-big")
        message = failed["pending_config"]["served_entities"][0]["state"]["deployment_state_message"]
        assert f"needs {cores} model unit(s), one CPU core each" in message and f"at most {cores - 1}" in message


@pytest.mark.slow
@pytest.mark.engine
def test_a_provisioned_endpoint_keeps_its_throughput_under_a_pay_per_token_flood(provisioned_server):
    from bench.bench_provisioned import CHAT, ask, run_phase

    url, token, _, _ = provisioned_server
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as warm:
        assert ask(warm, "reserved", 4)[0] == 200 and ask(warm, CHAT, 4)[0] == 200  # both engines up
    alone = run_phase(url, token, "reserved", clients=6, flood=0, seconds=15, max_tokens=32)
    flooded = run_phase(url, token, "reserved", clients=6, flood=24, seconds=15, max_tokens=32)
    assert alone.refused == 0 and flooded.refused == 0
    assert flooded.flood_tokens_per_second > 0  # the flood was served meanwhile, on the other cores
    assert flooded.tokens_per_second >= 0.8 * alone.tokens_per_second, (alone, flooded)


@pytest.mark.slow
@pytest.mark.engine
def test_requests_beyond_the_rate_queue_then_get_429_with_retry_after(provisioned_server):
    url, token, _, info = provisioned_server
    ask = {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1500, "temperature": 0}
    # each costs ~1,500 tokens when admitted: more than 31 s of work at the rate arrives at once
    burst = int(31 * info["throughput_chunk_size"] / 1500) + 8

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{url}/serving-endpoints/reserved/invocations", json=ask, timeout=600,
                          headers={"Authorization": f"Bearer {token}"})

    with ThreadPoolExecutor(max_workers=burst) as pool:
        answers = list(pool.map(one, range(burst)))
    refused = [a for a in answers if a.status_code == 429]
    assert refused and all(a.status_code in (200, 429) for a in answers)
    assert refused[0].json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert "its queue is full" in refused[0].json()["message"] and int(refused[0].headers["Retry-After"]) >= 1
