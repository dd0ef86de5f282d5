"""Provisioned throughput: the gate's pacing, core reservations, and (slow) a real server whose
provisioned endpoint keeps its throughput under a pay-per-token flood."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from engine import reservations
from serving.data.provisioned import BURST_SECONDS, ThroughputGate
from serving.errors import InvalidParameterValue, RequestLimitExceeded


QUEUE_SECONDS = 2


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


def test_the_gate_refuses_beyond_its_queue_with_retry_after_and_corrects_charges(monkeypatch):
    monkeypatch.setenv("SQLINFER_PROVISIONED_QUEUE_SECONDS", "2")
    clock = FakeClock()
    gate = ThroughputGate(100, "pt", clock=clock, sleep=lambda s: None)
    gate.admit(250, wait=False)  # 2.5 s of work ahead from now
    gate.admit(100, wait=False)  # its turn is 1.5 s away: it waits (within the 2 s queue)
    with pytest.raises(RequestLimitExceeded) as refused:
        gate.admit(10, wait=False)  # 3.5 s ahead: 2.5 s past the burst, beyond the queue
    assert "provisioned for 100 tokens/s and its queue is full (2 s of admitted work ahead" in refused.value.message
    assert refused.value.retry_after_seconds == 1.0
    gate.admit(10, wait=True)  # SQL batches wait instead
    gate.settle(estimated=250, used=50)  # the first used 50 of the 250 it was charged: 2 s come back
    gate.admit(10, wait=False)  # within the queue again
    gate.settle(estimated=10, used=510)  # an answer longer than its estimate is charged in full
    with pytest.raises(RequestLimitExceeded):
        gate.admit(10, wait=False)
    with pytest.raises(InvalidParameterValue) as too_big:
        ThroughputGate(100, "pt", clock=FakeClock()).admit(400, wait=False)
    assert "this request alone is 400 tokens (4 s of endpoint 'pt'" in too_big.value.message


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
    from bench.bench_provisioned import create_endpoints
    from bench.servers import start_server, stop_server

    home = tmp_path_factory.mktemp("provisioned") / "home"
    # a short queue, so that a burst of a few requests overflows it on any CPU
    process, url, token = start_server(home, {"SQLINFER_PROVISIONED_QUEUE_SECONDS": str(QUEUE_SECONDS)})
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
    import math

    url, token, _, info = provisioned_server
    chunk = info["throughput_chunk_size"]
    headers = {"Authorization": f"Bearer {token}"}
    # one request costing more than the whole queue (4 s of work > 2 s + 1 s of burst) is the caller's to fix
    n, per_answer = 16, min(2000, math.ceil(4 * chunk / 16) + 1)
    too_big = httpx.post(f"{url}/serving-endpoints/reserved/invocations", headers=headers, timeout=60, json={
        "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": per_answer, "n": n, "temperature": 1.0})
    assert too_big.status_code == 400 and "lower max_tokens or n" in too_big.json()["message"]
    # 8 requests of ~0.7 queue-lengths of work each arrive at once: the first two fit, later ones are refused
    cost = int(0.7 * (QUEUE_SECONDS + 1) * chunk)
    n = math.ceil(cost / 1900)  # answers stay inside the model's context on any CPU (n > 1 needs sampling)
    ask = {"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": math.ceil(cost / n), "n": n,
           "temperature": 0 if n == 1 else 1.0}

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{url}/serving-endpoints/reserved/invocations", json=ask, timeout=600, headers=headers)

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, range(8)))
    statuses = [a.status_code for a in answers]
    refused = [a for a in answers if a.status_code == 429]
    assert statuses.count(200) >= 2 and len(refused) >= 1 and statuses.count(200) + len(refused) == 8, statuses
    assert refused[0].json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert "its queue is full" in refused[0].json()["message"] and int(refused[0].headers["Retry-After"]) >= 1
